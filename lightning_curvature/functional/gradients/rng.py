"""The global random number generators' states, captured and put back as one value.

A loss may draw from torch's CPU generator, the CUDA generator of its device, python's
``random`` and numpy's global generator (dropout masks, noise, augmentation). SAM's second
pass replays the first pass's draws from a captured :class:`RNGState`, and then puts back the
state the first pass left.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["RNGState"]


@dataclass(frozen=True)
class RNGState:
    """The global RNG states a loss may draw from: torch CPU, one CUDA device, python, numpy.

    SAM's second pass replays the first pass's random draws (``dropout="reuse"``) by
    restoring the state captured before each first pass, and then puts back the state the
    first pass left, so the training run's random stream is the one it has without SAM.

    Example:
        >>> state = RNGState.capture(torch.device("cpu"))
        >>> first = torch.rand(2)
        >>> state.restore()
        >>> torch.equal(first, torch.rand(2))
        True
    """

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    cuda_device: torch.device | None
    python: Any
    numpy: Any

    @classmethod
    def capture(cls, device: torch.device) -> RNGState:
        """The current states (CUDA's only when ``device`` is a CUDA device)."""
        numpy_state = None
        with contextlib.suppress(ImportError):
            import numpy as np

            numpy_state = np.random.get_state()
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(
            cpu=torch.get_rng_state(),
            cuda=cuda,
            cuda_device=device if cuda is not None else None,
            python=random.getstate(),
            numpy=numpy_state,
        )

    def restore(self) -> None:
        """Set every captured state back."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None and self.cuda_device is not None:
            torch.cuda.set_rng_state(self.cuda, self.cuda_device)
        random.setstate(self.python)
        if self.numpy is not None:
            import numpy as np

            np.random.set_state(self.numpy)
