"""Gradient samples, the accumulator of their sums, and SAM's perturbation."""
