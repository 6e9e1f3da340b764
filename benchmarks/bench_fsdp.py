"""Curvature under FSDP2 on CPU (2 gloo processes): which exact routes fail, and what FD costs.

On a tanh/GELU MLP sharded with ``fully_shard`` (every Linear and the root), each process
probes its own batch; the reference is the dense Hessian of the unsharded model on the union
of the batches (float64). It prints, from rank 0:

* the exact (double-backward) routes tried through FSDP2 and the error each raises:
  ``create_graph`` on the shards; ``unshard()`` + ``set_reshard_after_forward(False)`` and
  ``HessianOperator(backend="double_backward")``;
* the finite-difference Hv error against the dense Hessian, in float32 and float64;
* the time of one sharded FD product over one sharded gradient (median of ``--repeats``).

    python benchmarks/bench_fsdp.py --width 64 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

from lightning_curvature.functional.linalg.sharded import local_tensor
from lightning_curvature.functional.operator.operator import HessianOperator


def _net(width: int, dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1)
    )
    return net.to(dtype)


def _loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(x).pow(2).mean()


def _sharded(width: int, dtype: torch.dtype) -> nn.Sequential:
    net = _net(width, dtype)
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(net)
    return net


def _exact_routes(width: int, x: torch.Tensor) -> list[str]:
    outcomes = []
    net = _sharded(width, torch.float32)
    try:
        torch.autograd.grad(_loss(net, x), list(net.parameters()), create_graph=True)
        outcomes.append("create_graph on shards: ran")
    except RuntimeError as err:
        outcomes.append(f"create_graph on shards: {str(err)[:90]}")
    net = _sharded(width, torch.float32)
    _loss(net, x).backward()  # lazy init, as training does
    for p in net.parameters():
        p.grad = None
    modules = [m for m in net.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        with HessianOperator(net, _loss, x, backend="double_backward") as operator:
            operator.matvec(torch.ones(operator.size))
        outcomes.append("unshard() + double_backward: ran")
    except RuntimeError as err:
        outcomes.append(f"unshard() + double_backward: {str(err)[:90]}")
    for m in modules:
        m.reshard()
    return outcomes


def _worker(rank: int, world: int, width: int, repeats: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    batches = [torch.randn(32, 8, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    lines = _exact_routes(width, batches[rank])
    for dtype in (torch.float32, torch.float64):
        net = _sharded(width, dtype)
        x = batches[rank].to(dtype)
        plain = _net(width, torch.float64)
        union = torch.cat(batches).double()
        sizes = [p.numel() for p in plain.parameters()]
        v = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(5), dtype=dtype)
        with HessianOperator(plain, _loss, union, backend="double_backward") as exact_operator:
            exact = exact_operator.matvec(v.double())
        # this rank's rows of v and of the exact product, in the sharded layout
        offsets, start, mine, theirs = [], 0, [], []
        for p, n in zip(net.parameters(), sizes, strict=True):
            rows = local_tensor(p).shape[0]
            first = sum(t.shape[0] for t in torch.chunk(torch.empty(p.shape[0]), world)[:rank])
            per_row = n // p.shape[0]
            offsets.append((start + first * per_row, start + (first + rows) * per_row))
            start += n
        mine = torch.cat([v[a:b] for a, b in offsets])
        theirs = torch.cat([exact[a:b] for a, b in offsets])
        times = []
        with HessianOperator(net, _loss, x) as operator:
            for _ in range(repeats):
                started = time.perf_counter()
                hv = operator.matvec(mine)
                times.append(time.perf_counter() - started)
        error = torch.stack([(hv.double() - theirs).square().sum(), theirs.square().sum()])
        dist.all_reduce(error)
        grad_times = []
        for _ in range(repeats):
            started = time.perf_counter()
            _loss(net, x).backward()
            grad_times.append(time.perf_counter() - started)
            for p in net.parameters():
                p.grad = None
        hvp, grad = statistics.median(times), statistics.median(grad_times)
        relative = float((error[0] / error[1]).sqrt())
        lines.append(
            f"{dtype}: P={sum(sizes)}, FD Hv relative error {relative:.2e}, "
            f"{hvp * 1e3:.1f} ms per HVP = {hvp / grad:.2f} sharded gradients"
        )
    if rank == 0:
        print("\n".join(lines))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--port", type=int, default=29541)
    args = parser.parse_args()
    mp.spawn(_worker, args=(2, args.width, args.repeats, args.port), nprocs=2)


if __name__ == "__main__":
    main()
