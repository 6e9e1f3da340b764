"""Fixtures of the model-zoo tests: no hub access, one thread per test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# Configs only, never a download: transformers and huggingface_hub read these at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The tiny models gain nothing from threads on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
