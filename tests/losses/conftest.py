"""Fixtures shared by the loss tests."""
import pytest
import torch

from clip_fast._backend import CONTRASTIVE, SIGLIP, select_backend
from clip_fast._ext import load_extension


@pytest.fixture(params=["cpp", "torch"])
def cpu_backend(request, monkeypatch):
    """Runs a test once per CPU implementation of the losses: the C++ ops (the default,
    CLIP_FAST_BACKEND=auto) and the pure-torch code (CLIP_FAST_BACKEND=torch). Checks that
    the losses really select it, so a missing extension cannot pass as the C++ run."""
    if request.param == "cpp" and load_extension() is None:
        pytest.skip("C++ extension unavailable")
    monkeypatch.setenv("CLIP_FAST_BACKEND", "auto" if request.param == "cpp" else "torch")
    probe = torch.zeros(2, 2)
    assert select_backend(CONTRASTIVE, probe) == select_backend(SIGLIP, probe) == request.param
    return request.param
