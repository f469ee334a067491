"""clip_fast._backend.select_backend, the one place that picks Triton, C++ or torch for
every op: each CLIP_FAST_BACKEND value x device x dtype x (extension built or not) x
(triton installed or not, interpreter on or off), then each op running what was chosen."""
import itertools
from types import SimpleNamespace

import pytest
import torch

from clip_fast import _backend, _ext, contrastive_cpp, optim, siglip_ops
from clip_fast._backend import ADAMW, CONTRASTIVE, SIGLIP, STOCHASTIC_ROUND, TRITON_ONLY, select_backend

HALF_AND_FP32 = {torch.float16, torch.bfloat16, torch.float32}
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# What each op's kernels take, as the ops' docstrings state it (not read from OpSupport):
# Triton kernels have no fp64 configuration (the attention pool's kernel upcasts any
# dtype); stochastic rounding is an fp32 -> bf16 cast; the losses' C++ kernels run on
# the fp32 blocks every non-fp64 input is upcast to; AdamW's C++ update takes every
# parameter dtype; the attention pool has no C++ twin.
TRITON_TAKES = {
    "contrastive": HALF_AND_FP32, "siglip": HALF_AND_FP32, "adamw": HALF_AND_FP32,
    "sr": {torch.float32}, "triton_only": set(DTYPES),
}
CPP_TAKES = {
    "contrastive": HALF_AND_FP32, "siglip": HALF_AND_FP32, "adamw": HALF_AND_FP32,
    "sr": {torch.float32}, "triton_only": set(),
}
OPS = {"contrastive": CONTRASTIVE, "siglip": SIGLIP, "adamw": ADAMW, "sr": STOCHASTIC_ROUND,
       "triton_only": TRITON_ONLY}


def _operand(device: str, dtype: torch.dtype) -> SimpleNamespace:
    """What the selection reads of a tensor (a CUDA one cannot be made on a CPU box)."""
    return SimpleNamespace(device=torch.device(device), dtype=dtype)


@pytest.fixture
def machine(monkeypatch):
    """Sets the environment and what is installed; returns the setter."""

    def set_machine(env: str, ext: bool, triton: bool, interpret: bool) -> None:
        monkeypatch.setenv("CLIP_FAST_BACKEND", env)
        monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
        monkeypatch.setattr(_ext, "load_extension", lambda: object() if ext else None)
        monkeypatch.setattr(_backend, "triton_available", lambda: triton)

    return set_machine


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ext", [True, False])
def test_auto_and_torch(machine, op, device, dtype, ext):
    operands = (_operand(device, dtype), _operand(device, dtype))
    machine("torch", ext, True, False)
    assert select_backend(OPS[op], *operands) == "torch"
    machine("auto", ext, True, False)
    if device == "cuda" and dtype in TRITON_TAKES[op]:
        expected = "triton"
    elif device == "cpu" and dtype in CPP_TAKES[op] and ext:
        expected = "cpp"
    else:
        expected = "torch"
    assert select_backend(OPS[op], *operands) == expected


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ext", [True, False])
def test_forced_triton(machine, op, dtype, ext):
    for device, interpret in itertools.product(["cpu", "cuda"], [True, False]):
        machine("triton", ext, True, interpret)
        operands = (_operand(device, dtype),)
        if dtype not in TRITON_TAKES[op]:  # no kernel for it: C++ or torch, as under auto
            cpp = device == "cpu" and dtype in CPP_TAKES[op] and ext
            assert select_backend(OPS[op], *operands) == ("cpp" if cpp else "torch")
        elif device == "cuda" or interpret:
            assert select_backend(OPS[op], *operands) == "triton"
        else:
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
                select_backend(OPS[op], *operands)


def test_missing_triton_falls_back_under_auto_and_raises_when_forced(machine):
    cuda = _operand("cuda", torch.float32)
    machine("auto", True, False, False)
    with pytest.warns(RuntimeWarning, match="triton is not installed"):
        _backend.warn_once.cache_clear()
        assert select_backend(CONTRASTIVE, cuda) == "torch"  # CUDA tensors: no C++ twin either
    assert select_backend(CONTRASTIVE, _operand("cpu", torch.float32)) == "cpp"
    machine("triton", True, False, True)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        select_backend(CONTRASTIVE, cuda)


def test_mixed_devices_never_pick_a_single_device_backend(machine):
    machine("auto", True, True, False)
    mixed = (_operand("cpu", torch.float32), _operand("cuda", torch.float32))
    assert select_backend(ADAMW, *mixed) == "torch"


def test_bad_environment_value_names_the_variable(machine):
    machine("auto", True, True, False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIP_FAST_BACKEND", "cuda")
        with pytest.raises(ValueError, match="CLIP_FAST_BACKEND must be one of"):
            select_backend(CONTRASTIVE, _operand("cpu", torch.float32))


def test_triton_only_ops_choose_between_triton_and_torch(machine):
    """The attention pool has no C++ twin: CPU tensors get torch under auto, the
    interpreter's Triton under CLIP_FAST_BACKEND=triton (any float dtype)."""
    machine("auto", True, True, False)
    assert select_backend(TRITON_ONLY, torch.zeros(2)) == "torch"
    machine("triton", True, True, True)
    assert select_backend(TRITON_ONLY, torch.zeros(2, dtype=torch.float64)) == "triton"


# ------------------------------------------------------------------ each op runs the choice


def _spy(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or original(*a, **k))
    return calls


def test_each_cpu_op_calls_its_cpp_twin_exactly_when_selected(monkeypatch):
    if _ext.load_extension() is None:
        pytest.skip("C++ extension unavailable")
    from clip_fast import ContrastiveLoss, SigLipLoss

    x, y = torch.randn(6, 4), torch.randn(6, 4)
    model = torch.nn.Linear(3, 2)
    for env in ("auto", "torch"):
        monkeypatch.setenv("CLIP_FAST_BACKEND", env)
        lse = _spy(monkeypatch, contrastive_cpp, "block_lse")
        fused = _spy(monkeypatch, siglip_ops, "block_fused")
        update = _spy(monkeypatch, optim, "_cpp_update")
        ContrastiveLoss()(x, y, 3.0)
        SigLipLoss()(x, y, 3.0, -1.0)
        model(torch.randn(5, 3)).sum().backward()
        optim.AdamW(model.parameters(), lr=1e-3).step()
        # fp64 always runs the torch code (gradcheck), whatever the environment
        ContrastiveLoss()(x.double(), y.double(), 3.0)
        SigLipLoss()(x.double(), y.double(), 3.0, -1.0)
        expected = 1 if env == "auto" else 0
        assert (len(lse), len(fused), len(update)) == (expected, expected, expected), env
        monkeypatch.undo()
