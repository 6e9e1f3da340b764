"""Run by test_fsdp_landscape.py: two processes (gloo, CPU) under ModelParallelStrategy (FSDP2).

Usage: python fsdp_landscape_script.py OUT_DIR.

Trains the smooth MLP of ``fsdp_script.py``, sharded with ``fully_shard``, with SGD with
momentum (its next update reads the shards of the momentum buffers), twice: with
``LossLandscapeMonitor`` and ``CriticalSharpnessMonitor`` probing at steps 0 and 2, and
without them. Then, on the trained sharded model, ``loss_slice`` and ``critical_sharpness``
along two fixed full directions handed to each rank as its shards. Each rank writes
rank<r>.json (the monitors' last values) and rank<r>.pt (the monitors' probe batches, the
full weights and momentum buffers at every step start, the final full weights of both
trainings, the functional results, the weights before and after them). A point blown up
to a non-finite loss (``t = 1e30``) is kept as it is, on both ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from fsdp_script import Capture, Sharded, data, fit, full_weights, loss_of
from launch import run_rank
from torch import nn
from torch.distributed.tensor import distribute_tensor

from lightning_curvature import (
    CriticalSharpnessMonitor,
    LossLandscapeMonitor,
    critical_sharpness,
    loss_slice,
)

MOMENTUM = 0.9
OFFSETS = [-1.0, -0.5, 0.0, 0.5, 1.0]


def _momentum_configure(self: Sharded) -> torch.optim.Optimizer:
    return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=MOMENTUM)


Sharded.configure_optimizers = _momentum_configure  # type: ignore[method-assign]


class Buffers(Capture):
    """Also the full momentum buffers at each step start (a collective, as the weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.momentum: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        state = trainer.optimizers[0].state
        self.momentum[trainer.global_step] = {
            name: state[p]["momentum_buffer"].full_tensor().clone()
            for name, p in pl_module.net.named_parameters()
            if state.get(p, {}).get("momentum_buffer") is not None
        }


def shards_of(net: nn.Module, full: torch.Tensor) -> torch.Tensor:
    """This rank's shards of flat vectors ``full`` (``(k, P)``), in the operator's layout."""
    rows = []
    for vector in full:
        pieces, start = [], 0
        for p in net.parameters():
            whole = vector[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
            local = distribute_tensor(whole, p.device_mesh, p.placements).to_local()
            pieces.append(local.reshape(-1))
        rows.append(torch.cat(pieces))
    return torch.stack(rows)


def main() -> None:
    out = Path(sys.argv[1])
    capture = Buffers()
    monitors = [
        LossLandscapeMonitor(every_n_steps=2, num_points=5),
        CriticalSharpnessMonitor(every_n_steps=2, rtol=1e-4),
    ]
    trainer, module = fit([capture, *monitors], out)
    rank = trainer.global_rank
    net = module.net
    final = full_weights(net)

    size = sum(p.numel() for p in final.values())
    directions = torch.randn(2, size, generator=torch.Generator().manual_seed(1)) * 0.3
    x, y = (t[:32] for t in data().tensors)  # rank r probes rows 16r to 16r + 15
    batch = (x[16 * rank : 16 * (rank + 1)], y[16 * rank : 16 * (rank + 1)])
    line = loss_slice(net, loss_of, batch, shards_of(net, directions), OFFSETS)
    sharpness = critical_sharpness(net, loss_of, batch, lambda g: g, init=0.1, rtol=1e-4)
    far = loss_slice(net, loss_of, batch, shards_of(net, directions[:1]), [0.0, 1e30])
    after = full_weights(net)

    _, plain = fit([], out)
    values = {type(m).__name__: m.last_metrics for m in monitors}
    (out / f"rank{rank}.json").write_text(json.dumps({"values": values}))
    torch.save(
        {
            "probe": [list(m.fixed_probe or []) for m in monitors],
            "weights": capture.weights,
            "momentum": capture.momentum,
            "final": final,
            "after_functional": after,
            "final_without_monitors": full_weights(plain.net),
            "directions": directions,
            "union": (x, y),
            "slice": {
                "losses": line.losses,
                "loss": line.loss,
                "slopes": line.slopes,
                "hessian_form": line.hessian_form,
                "squared_norms": line.squared_norms,
                "num_forwards": line.num_forwards,
            },
            "far": far.losses,
            "critical": {
                "value": sharpness.value,
                "lower": sharpness.lower,
                "upper": sharpness.upper,
                "converged": sharpness.converged,
                "slope": sharpness.slope,
            },
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    run_rank(main)
