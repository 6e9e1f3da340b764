"""Random vectors from an explicit generator on the operator's device (never the global RNG)."""

from __future__ import annotations

import torch

__all__ = ["check_generator", "make_generator", "rademacher"]


def make_generator(device: torch.device, seed: int = 0) -> torch.Generator:
    """A new generator on ``device`` seeded with ``seed``.

    Example:
        >>> make_generator(torch.device("cpu"), 3).initial_seed()
        3
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def check_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """``generator``, or a new one seeded with 0, checked to live on ``device``'s type.

    Raises:
        TypeError: if ``generator`` is not a ``torch.Generator`` (or ``None``).
        ValueError: if the generator is on another device type than the model.

    Example:
        >>> check_generator(None, torch.device("cpu")).device.type
        'cpu'
    """
    if generator is None:
        return make_generator(device)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or None, got {generator!r}.")
    if generator.device.type != device.type:
        raise ValueError(
            f"`generator` is on {generator.device.type!r} but the model is on {device.type!r}; "
            "create it with torch.Generator(device=<the model's device>)."
        )
    return generator


def rademacher(
    shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Entries ±1 with equal probability.

    Example:
        >>> cpu = torch.device("cpu")
        >>> z = rademacher((1000,), make_generator(cpu), torch.float32, cpu)
        >>> z.unique().tolist()
        [-1.0, 1.0]
    """
    bits = torch.randint(0, 2, shape, generator=generator, device=device)
    return (2 * bits - 1).to(dtype)
