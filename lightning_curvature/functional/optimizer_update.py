"""The update an optimizer would take next, computed from its state without stepping it.

Critical sharpness (:mod:`~lightning_curvature.functional.critical_sharpness`) is measured
along the step the optimizer is about to take. For ``torch.optim.SGD`` (momentum, dampening,
Nesterov, weight decay, ``maximize``) and ``Adam``/``AdamW`` (bias corrections, coupled or
decoupled weight decay, ``amsgrad``, ``maximize``) that step is a few element-wise operations
on a gradient and the optimizer's state, done here on new tensors: the state is read, never
written, and nothing is stepped. The update is returned per unit of the reference learning
rate ``η`` (the largest of the groups', as in
:func:`~lightning_curvature.functional.stability.stability_threshold`): the optimizer moves
the weights to ``w − η·u`` (a group with a smaller rate contributes ``lr_g/η`` of its part).
It is what torch's own step computes, to rounding (checked against ``optimizer.step()`` on
copies in ``tests/functional/test_optimizer_update.py``).

**Why the next update, not the last.** At the edge of stability the iterate jumps across the
valley of the top eigenvector at every step, so from the new weights the last update's
component along it points back uphill: along the *last* update the loss rises at once and
``η_c`` collapses to 0, while along the next one (from the current gradient) the loss first
falls, and ``η_c`` is the step size the edge is about. **Why not a step on a copy.** A copy
of the optimizer holds its whole state again (``2P`` values for Adam) and steps every
parameter; the formula costs a few ``P``-vectors of temporaries and no copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_curvature.functional.linalg.sharded import local_tensor

__all__ = ["OptimizerUpdate", "next_update"]


@dataclass(frozen=True)
class OptimizerUpdate:
    """The optimizer's next update, per unit of its learning rate.

    Attributes:
        update: flat ``u`` over the given parameters: the step is ``w ← w − lr·u``.
        lr: the reference learning rate (the largest group's).
        kind: ``"sgd"`` or ``"adam"``.

    Example:
        >>> OptimizerUpdate(torch.tensor([0.5]), 0.1, "sgd").step
        tensor([0.0500])
    """

    update: torch.Tensor
    lr: float
    kind: str

    @property
    def step(self) -> torch.Tensor:
        """``lr·u``: what the optimizer subtracts from the weights."""
        return self.lr * self.update


def _float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _sgd(p: torch.Tensor, g: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> Any:
    d = -g if group.get("maximize", False) else g
    weight_decay = _float(group.get("weight_decay", 0.0))
    if weight_decay:
        d = d.add(p.detach(), alpha=weight_decay)
    momentum = _float(group.get("momentum", 0.0))
    if not momentum:
        return d
    buf = state.get("momentum_buffer")
    if buf is None:  # the first step starts the buffer at d
        buf = d
    else:
        buf = buf.mul(momentum).add(d, alpha=1.0 - _float(group.get("dampening", 0.0)))
    return d.add(buf, alpha=momentum) if group.get("nesterov", False) else buf


def _adam(p: torch.Tensor, g: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> Any:
    g = -g if group.get("maximize", False) else g
    beta1, beta2 = (_float(b) for b in group["betas"])
    weight_decay = _float(group.get("weight_decay", 0.0))
    decoupled = bool(group.get("decoupled_weight_decay", False))
    if weight_decay and not decoupled:
        g = g.add(p.detach(), alpha=weight_decay)
    step = _float(state.get("step", 0.0)) + 1.0
    first = state.get("exp_avg", torch.zeros_like(g)).lerp(g, 1.0 - beta1)
    second = state.get("exp_avg_sq", torch.zeros_like(g)).mul(beta2)
    second = second.addcmul(g, g, value=1.0 - beta2)
    if group.get("amsgrad", False):
        second = torch.maximum(state.get("max_exp_avg_sq", second), second)
    denominator = (second.sqrt() / (1.0 - beta2**step) ** 0.5).add(_float(group["eps"]))
    update = first.div(denominator).div(1.0 - beta1**step)
    if weight_decay and decoupled:  # w(1 − lr·wd) − lr·(…) = w − lr·(wd·w + …)
        update = update.add(p.detach(), alpha=weight_decay)
    return update


def next_update(
    optimizer: torch.optim.Optimizer, parameters: Sequence[torch.Tensor], gradient: torch.Tensor
) -> OptimizerUpdate | None:
    """The update ``optimizer`` would take from ``gradient``, without stepping it.

    Args:
        optimizer: a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (subclasses included).
        parameters: the measured parameters, in the layout of ``gradient``.
        gradient: a flat gradient over ``parameters`` (e.g. the probe's). Over FSDP2
            (``DTensor``) parameters, over this process's shards of them, whose optimizer
            state is read from its shards too: the update is this process's shard.

    Returns:
        The update per unit of the reference learning rate (zero for a parameter the
        optimizer does not hold), or ``None`` for another optimizer or a learning rate of 0.

    Raises:
        ValueError: if ``gradient`` is not a flat vector over ``parameters``.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> sgd = torch.optim.SGD([w], lr=0.1, weight_decay=0.5)
        >>> next_update(sgd, [w], torch.tensor([3.0, 1.0])).update  # g + wd·w
        tensor([3.5000, 0.0000])
        >>> adam = torch.optim.Adam([w], lr=0.1)
        >>> next_update(adam, [w], torch.tensor([3.0, -1.0])).update  # ≈ sign(g) at first
        tensor([ 1.0000, -1.0000])
    """
    pieces_of = [local_tensor(p) for p in parameters]  # FSDP2: this process's shards
    size = sum(p.numel() for p in pieces_of)
    if gradient.shape != (size,):
        raise ValueError(
            f"`gradient` must have shape ({size},) over `parameters`, got {tuple(gradient.shape)}."
        )
    if isinstance(optimizer, torch.optim.SGD):
        kind, rule = "sgd", _sgd
    elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        kind, rule = "adam", _adam
    else:
        return None
    lr = max(_float(g["lr"]) for g in optimizer.param_groups)
    if not lr > 0:
        return None
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    pieces = []
    sizes = [p.numel() for p in pieces_of]
    for p, local, g in zip(parameters, pieces_of, torch.split(gradient, sizes), strict=True):
        group = group_of.get(id(p))
        if group is None:  # not optimized: no motion along these coordinates
            pieces.append(torch.zeros_like(g))
            continue
        g = g.reshape(local.shape).to(local.dtype)
        state = {k: local_tensor(v) for k, v in optimizer.state.get(p, {}).items()}
        moved = rule(local, g, group, state)
        pieces.append(moved.reshape(-1).mul(_float(group["lr"]) / lr))
    return OptimizerUpdate(torch.cat(pieces).to(gradient.dtype), lr, kind)
