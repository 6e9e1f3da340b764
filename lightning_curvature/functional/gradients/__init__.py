"""Gradients as samples and sums.

Per-example and micro-batch samples, the accumulator of their sums, the summed gradient of a
stream of losses, SAM's perturbation and the RNG state its second pass replays.
"""
