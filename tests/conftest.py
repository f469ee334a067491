import pytest
import torch


def pytest_sessionstart(session):
    # Build (or load from its cache) the C++ extension once, up front: otherwise the first
    # test to use it pays the ~40 s JIT compile, possibly inside spawned ranks or
    # subprocesses running under a timeout.
    from clip_fast._ext import load_extension

    load_extension()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
