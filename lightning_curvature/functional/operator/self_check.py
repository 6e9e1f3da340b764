"""The operator's check of its own products: are they derivatives of the gradient?

Lists of kinked modules and ops (:mod:`~lightning_curvature.functional.operator.kinks`)
will always miss the next op; so every probe checks its products by two tests on numbers
it has anyway, or nearly:

* **symmetry**, every product against the one before it: a Hessian is symmetric, so
  ``uᵀ(Hv) = vᵀ(Hu)`` up to the products' own error. No product: four inner products (one
  collective over shards), the previous vector (a reference where it is a tensor of its
  own, a copy where it is a view into a larger one) and a reference to the previous
  product until the next one begins (about 5 ms per million parameters on one CPU
  thread: 4-7% of a product of the 23M GPT-2 of ``benchmarks/bench_self_check.py``). It
  finds a finite difference that crosses a kink (the jump of the gradient lies along the
  kinked op's gradient, not along the vectors) and a double backward that is wrong
  (``weight_norm``'s products are 2% asymmetric when 38-160% off). The measure is
  ``|uᵀHv − vᵀHu| / √(‖u‖‖Hv‖·‖v‖‖Hu‖)``: the geometric mean keeps a product blown up by a
  kink from hiding its own asymmetry. Products of (near-)null directions, below 5% of the
  largest product of the probe, are judged against 5% of it instead: their own norms are
  mostly rounding; so are those of an operator zero to rounding (a block whose Hessian
  vanishes), below ``1e-5·|L|/rms(w)²`` (the loss over the weights' scale squared, the
  order of a Hessian entry): they are judged against that.
* **half the step**, finite differences only, on the first product of a probe: the
  central difference at ``ε`` and at ``ε/2``. Smooth, they differ by ``¾`` of the
  truncation ``O(ε²)`` plus the rounding ``O(eps/ε)``; a kink crossed at ``ε`` puts
  ``J/2ε`` into the first and ``J/ε`` or nothing into the second, so the difference is at
  least the error of the product returned (measured 0.5-1 relative on every kinked case).
  Cost: one more product (two gradients) per probe; it also catches a step too large for
  the model (the truncation), and a probe of one product, which has no pair. Not taken
  where the model computes in bfloat16 or float16: there the two steps differ by up to
  48% on smooth models (rounding), as much as a kink; symmetry, 3% at most there, checks
  such products alone (a probe of one product goes unchecked).

A discrepancy above the tolerance raises
:class:`~lightning_curvature.errors.CurvatureCheckError` (a monitor skips the probe with one
warning); the message names the cause, the suspects of the loss's graph and the way out.

The tolerance is for the dtype the model computes in (``eps``): ``400·eps^{2/3}`` (9.7e-3 in
float32, 1.5e-8 in float64), the order ``eps^{2/3}`` of a finite difference's error at its
balanced step with a margin: measured in float32 on the smooth test cases and the zoo
(transformers GPT-2, BERT, Llama, Mixtral, litgpt, an LSTM), at most 9e-4 for the half step
and 3e-4 for symmetry (7% of the tolerance), 1.1e-3 (11%) on a 23M-parameter GPT-2, while
every kinked case gave 0.5-1 and 1e-2-0.3. The exact backends get the same: their products
are exact to rounding, but the rounding of a float32 product of that GPT-2 is already
3e-4 asymmetric (a tolerance of ``10⁴·eps`` = 1.2e-3 would leave a margin of four), while a
wrong double backward is off by percents (``weight_norm`` 2% asymmetric, the test's
custom Function 18%). Capped at 0.25, so that a bfloat16 forward (products 1-10% off
whatever the step) still has its kinks found. On a CUDA device that allows TF32 matmuls or
convolutions, float32 products round like float16 (:func:`rounding_dtype`, not measured
here: no GPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lightning_curvature.errors import CurvatureCheckError, NonFiniteCurvatureError
from lightning_curvature.functional.linalg.sharded import VectorShards

__all__ = ["ProductCheck", "rounding_dtype", "tolerance"]

_RELATIVE, _CAP = 400.0, 0.25  # the tolerance: 400·eps^(2/3), at most 0.25
_NULL = 0.05  # products below this share of the largest are judged against the largest
_ZERO = 1e-5  # products below this share of |L|/rms(w)² are zero to rounding


def _version(tensor: torch.Tensor) -> int:
    """``tensor``'s version counter (-1 where it has none: an inference tensor)."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return -1


def rounding_dtype(dtype: torch.dtype, device: torch.device, model: nn.Module) -> torch.dtype:
    """The dtype whose rounding the products carry, for the tolerance.

    ``dtype``, except float32 on a CUDA device where TF32 is allowed: matmuls with
    ``torch.set_float32_matmul_precision("high")`` (or ``allow_tf32``), convolutions with
    cuDNN's ``allow_tf32`` (its default) in a model that has any, round to a 10-bit
    mantissa, float16's (``"medium"``: bfloat16's). Their exact products are then
    asymmetric by about 1e-3, a tenth of the float32 tolerance: too close.

    Example:
        >>> rounding_dtype(torch.float32, torch.device("cpu"), nn.Linear(2, 2))
        torch.float32
    """
    if dtype != torch.float32 or device.type != "cuda":
        return dtype
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return torch.bfloat16
    convolutions = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    if (
        precision == "high"
        or torch.backends.cuda.matmul.allow_tf32
        or (convolutions and torch.backends.cudnn.allow_tf32)
    ):
        return torch.float16
    return dtype


def tolerance(compute_dtype: torch.dtype) -> float:
    """The largest relative discrepancy the self-check lets through (see the module doc).

    Example:
        >>> f"{tolerance(torch.float32):.1e}", f"{tolerance(torch.float64):.1e}"
        ('9.7e-03', '1.5e-08')
    """
    return min(_RELATIVE * math.pow(torch.finfo(compute_dtype).eps, 2 / 3), _CAP)


class ProductCheck:
    """The self-check of one open operator's products.

    Args:
        shards: how the vectors are split across processes (inner products are summed).

    Attributes:
        backend: the backend whose products are checked (set by the operator).
        compute_dtype: the narrowest dtype the model computes in (the tolerance's ``eps``).
        suspects: ops of the loss's graph named as the likely cause of a failure.
        largest: the largest discrepancy seen, relative to the tolerance (0 if none yet).
        sharded: whether only finite differences can run (the way out then differs).
        curvature_scale: ``|L| / max(rms(w), 0.01)²`` of the probe (the same on every
            process): products below ``1e-5`` of it are zero to rounding, not asymmetric.
    """

    def __init__(self, shards: VectorShards, sharded: bool = False) -> None:
        self._shards = shards
        self.backend = "auto"
        self.compute_dtype = torch.float32
        self.suspects: list[str] = []
        self.largest = 0.0
        self.sharded = sharded
        self._kept: tuple[torch.Tensor, int] | None = None  # the previous vector u, its version
        self._copy: torch.Tensor | None = None  # the buffer u is copied to when it is a view
        self._product: tuple[torch.Tensor, int] | None = None  # Hu, and its version then
        self._early: tuple[torch.Tensor, torch.Tensor] | None = None  # v and vᵀ(Hu), local
        self._norms = (0.0, 0.0)  # ‖u‖, ‖Hu‖
        self._largest_product = 0.0  # ‖Hv‖/‖v‖, the largest so far: the operator's scale
        self.curvature_scale = 0.0  # |L| / max(rms(w), 0.01)², set by the operator

    def forget(self) -> None:
        """Drop the kept pair (the operator closed: the next probe starts afresh)."""
        self._kept, self._product, self._largest_product = None, None, 0.0
        self._copy, self._early = None, None

    def prepare(self, vector: torch.Tensor) -> None:
        """Take ``vᵀ(Hu)`` before ``Hv`` is, and let go of ``Hu``.

        Called by the operator before each product: the previous product is then not held
        through the next backward, a probe's largest moment (one vector less at a λ₁
        probe's peak). This process's share of the inner product waits for
        :meth:`symmetric`, which sums it over processes with the others.
        """
        hu = self._unchanged(self._product)
        self._product = None
        local = None if hu is None else torch.dot(vector.to(hu.dtype).reshape(-1), hu)
        self._early = None if local is None else (vector, local)

    @property
    def tolerance(self) -> float:
        """The tolerance of the dtype the products round in."""
        return tolerance(self.compute_dtype)

    def _sums(self, values: Sequence[torch.Tensor]) -> list[float]:
        """Local sums added over processes in one collective."""
        local = torch.stack(list(values)).to(torch.float64)
        return self._shards.all_sum(local).tolist()  # type: ignore[no-any-return]

    @staticmethod
    def _unchanged(kept: tuple[torch.Tensor, int] | None) -> torch.Tensor | None:
        """The tensor kept, unless it was changed in place since (then no comparison)."""
        if kept is None:
            return None
        tensor, version = kept
        return tensor if _version(tensor) == version else None

    def symmetric(self, vector: torch.Tensor, product: torch.Tensor) -> None:
        """Compare ``vᵀ(Hu)`` with ``uᵀ(Hv)`` for the previous pair ``(u, Hu)``; keep this one.

        The previous product is kept as it was returned until :meth:`prepare` takes its
        inner product with this vector (before this product, where the operator calls it;
        else here), and the previous vector where it is a tensor of its own (Lanczos' rows
        when it keeps only its last ones, trace probes): no copy of ``P`` entries. A vector
        that is a view into a larger tensor (a row of a Lanczos basis, whose next row is
        written into the same storage) is copied to one buffer. A caller that changes a
        kept tensor in place only skips that comparison. The inner products are taken in
        the vectors' dtype (BLAS accumulation: 3e-9 relative to ``‖u‖‖v‖`` on 23M float32
        entries, far below the tolerance) and summed over processes in one collective.

        Raises:
            CurvatureCheckError: if they differ by more than the tolerance.
        """
        if self._early is None or self._early[0] is not vector:
            self.prepare(vector)  # not prepared for this vector (a batched row): now
        early, self._early = self._early, None
        vector = vector.to(product.dtype).reshape(-1)
        u = self._unchanged(self._kept)
        if early is None or u is None:
            sums = self._sums([torch.dot(vector, vector), torch.dot(product, product)])
            self._keep(vector, product, sums[0] ** 0.5, sums[1] ** 0.5)
            return
        u_norm, hu_norm = self._norms
        sums = self._sums(
            [
                torch.dot(u, product),
                early[1],
                torch.dot(vector, vector),
                torch.dot(product, product),
            ]
        )
        u_hv, v_hu, v_squared, hv_squared = sums
        v_norm, hv_norm = v_squared**0.5, hv_squared**0.5
        # The pair's geometric mean, or a twentieth of the largest product so far if larger:
        # products of (near-)null directions are judged against the operator's scale; and
        # an operator zero to rounding at the loss's scale is no asymmetric operator.
        floor = max(_NULL * self._largest_product, _ZERO * self.curvature_scale) * u_norm * v_norm
        scale = max((u_norm * hv_norm * v_norm * hu_norm) ** 0.5, floor)
        self._keep(vector, product, v_norm, hv_norm)
        if scale > 0:
            what = f"uᵀHv = {u_hv:.6g} but vᵀHu = {v_hu:.6g} for consecutive products"
            self._judge(abs(u_hv - v_hu) / scale, what)

    def _keep(self, vector: torch.Tensor, product: torch.Tensor, v_norm: float, hv: float) -> None:
        owner = vector if vector._base is None else vector._base
        if owner.numel() != vector.numel():  # a view into more: its storage will be written
            if self._copy is None or self._copy.shape != vector.shape:
                self._copy = torch.empty_like(vector)
            vector = self._copy.copy_(vector)
        self._kept = (vector, _version(vector))
        self._product = (product, _version(product))
        self._norms = (v_norm, hv)
        if v_norm > 0:
            self._largest_product = max(self._largest_product, hv / v_norm)

    @property
    def halves(self) -> bool:
        """Whether the first finite difference is also taken at half its step.

        Where the model computes in float32 or float64 (see the module doc).
        """
        return torch.finfo(self.compute_dtype).bits >= 32

    def halved(self, full: torch.Tensor, half: torch.Tensor) -> None:
        """Compare the finite difference at the step with the one at half the step.

        Raises:
            CurvatureCheckError: if they differ by more than the tolerance.
        """
        diff = full - half
        sums = self._sums([torch.dot(diff, diff), torch.dot(full, full), torch.dot(half, half)])
        scale = max(sums[1], sums[2]) ** 0.5
        if scale > 0:
            self._judge(sums[0] ** 0.5 / scale, "H·v at the step ε and at ε/2")

    def _judge(self, discrepancy: float, what: str) -> None:
        if not math.isfinite(discrepancy):  # the same sums on every process: one verdict
            raise NonFiniteCurvatureError("a Hessian-vector product is not finite.")
        allowed = self.tolerance
        self.largest = max(self.largest, discrepancy / allowed)
        if discrepancy > allowed:
            raise CurvatureCheckError(self._message(discrepancy, allowed, what))

    def _message(self, discrepancy: float, allowed: float, what: str) -> str:
        dtype = str(self.compute_dtype).removeprefix("torch.")
        found = (
            f"{what} differ by {discrepancy:.2g} relative, where truncation and rounding in "
            f"{dtype} allow {allowed:.2g}"
        )
        named = f" The loss's graph has {', '.join(self.suspects)}." if self.suspects else ""
        if self.backend == "finite_difference":
            exact = (
                "leave the parameters before the op out with `parameters=` (finite "
                "differences are the only backend over sharded parameters)"
                if self.sharded
                else "use an exact backend (backend='double_backward' or 'retained_graph')"
            )
            return (
                f"finite-difference products failed their self-check: {found}. The gradient is "
                "not smooth at the step's scale (a kink of a non-smooth op within ±ε·v: top-k "
                "routing near a tie, a clamp, abs, a hard activation) or the step is too large "
                "for some parameter, so the products are not the Hessian autograd defines and "
                f"no value is returned.{named} To measure it, {exact}, or make the op smooth."
            )
        return (
            f"Hessian-vector products with backend={self.backend!r} failed their symmetry "
            f"self-check: {found}. Autograd's second derivative through some op of this model "
            "is wrong, or the function changes from product to product (state a forward "
            "updates in training mode, kept with dropout=True: spectral_norm's power "
            f"iteration), so no value is returned.{named} Use backend='finite_difference' "
            "(first derivatives only) if the model is smooth, or dropout=False."
        )
