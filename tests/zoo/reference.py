"""Independent float64 references: plain double backward, dense columns, scipy's eigsh.

Nothing here uses the library. The model is copied to float64 with the same weights; the
Hessian-vector product is ``torch.autograd.grad`` of the gradient (built once with
``create_graph=True``) against ``v``. ``torch.func.hessian`` is not used: in torch 2.13 it is
wrong through ``layer_norm`` whose input depends on a parameter (issue 10), while double
backward agrees with central finite differences (``test_dense_reference_...``). Attention
runs on the math kernel of ``scaled_dot_product_attention`` (the fused CPU kernel has no
double backward).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.zoo.zoo import LossFn, ZooCase

D = torch.float64


def to_float64(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {key: to_float64(value) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_float64(item) for item in batch)
    return batch


def measured(model: nn.Module, patterns: Sequence[str] | None) -> list[nn.Parameter]:
    """Trainable parameters (shared ones once), optionally those whose name matches."""
    return [
        parameter
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
        and (patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns))
    ]


def flat_gradient(
    model: nn.Module, loss_fn: LossFn, batch: Any, params: Sequence[torch.Tensor], graph: bool
) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
        loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, params, create_graph=graph, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


class Reference:
    """The float64 Hessian of a :class:`ZooCase`'s loss at its weights, by double backward."""

    def __init__(self, case: ZooCase, *, eval_mode: bool = False) -> None:
        self.model = copy.deepcopy(case.model).double()
        if eval_mode:
            self.model.eval()
        self.loss_fn = case.loss_fn
        self.batch = to_float64(case.batch)
        self.patterns = case.parameters
        self.params = measured(self.model, case.parameters)
        self.gradient = flat_gradient(self.model, self.loss_fn, self.batch, self.params, True)
        self.size = self.gradient.numel()
        self.num_hvps = 0

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        self.num_hvps += 1
        parts = torch.autograd.grad(
            self.gradient, self.params, vector, retain_graph=True, allow_unused=True
        )
        return torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, p in zip(parts, self.params, strict=True)
            ]
        )

    def dense(self) -> torch.Tensor:
        """Column by column; symmetric to rounding, returned symmetrised."""
        eye = torch.eye(self.size, dtype=D)
        hessian = torch.stack([self.hvp(column) for column in eye], dim=1)
        assert torch.allclose(hessian, hessian.T, rtol=0, atol=1e-10 * hessian.abs().max())
        return (hessian + hessian.T) / 2

    def finite_difference(self, vector: torch.Tensor, step: float = 1e-5) -> torch.Tensor:
        """``(∇L(w + h v) − ∇L(w − h v)) / 2h``: O(h²) accurate."""
        model = copy.deepcopy(self.model)  # perturbed in place; self's graph stays valid
        params = measured(model, self.patterns)
        pieces = vector.split([p.numel() for p in params])

        def gradient_at(sign: float) -> torch.Tensor:
            with torch.no_grad():
                for p, piece, p0 in zip(params, pieces, self.params, strict=True):
                    p.copy_(p0 + sign * step * piece.view_as(p))
            return flat_gradient(model, self.loss_fn, self.batch, params, False)

        return (gradient_at(1.0) - gradient_at(-1.0)) / (2 * step)

    def top_eigenvalues(self, k: int) -> torch.Tensor:
        """Largest ``k`` (algebraic) by ARPACK's Lanczos at ``tol=1e-10``."""
        operator = LinearOperator(
            (self.size, self.size),
            matvec=lambda x: self.hvp(torch.from_numpy(np.asarray(x).reshape(-1))).numpy(),
            dtype=np.float64,
        )
        start = np.random.default_rng(0).standard_normal(self.size)
        values = eigsh(operator, k=k, which="LA", tol=1e-10, v0=start, ncv=min(self.size, 40))
        return torch.from_numpy(np.sort(values[0])[::-1].copy())

    def hutchinson(self, probes: int, seed: int = 1) -> tuple[float, float]:
        """Trace and its standard error from ``probes`` Rademacher probes."""
        generator = torch.Generator().manual_seed(seed)
        samples = []
        for _ in range(probes):
            z = torch.randint(0, 2, (self.size,), generator=generator).to(D).mul_(2).sub_(1)
            samples.append(float(z @ self.hvp(z)))
        values = torch.tensor(samples, dtype=D)
        return float(values.mean()), float(values.std() / probes**0.5)
