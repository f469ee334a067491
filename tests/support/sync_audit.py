"""A dispatch-mode audit of the operations that make the host wait for a GPU.

`SyncAudit` is a TorchDispatchMode that records, while it is active, every ATen call that
on a CUDA device would block the host thread until the GPU catches up:

  host reads      aten._local_scalar_dense: `.item()`, `.tolist()`, `bool(t)`, `int(t)`,
                  `float(t)`, Python `if t:`;
  data-dependent  ops whose output shape depends on tensor values (the host has to read
  shapes          the size back): nonzero, masked_select, unique*, boolean-mask indexing
                  and index_put_, repeat_interleave without output_size, ...;
  host data       tensors made from Python data (`torch.tensor(list)`, aten.lift_fresh):
                  on a GPU run they are created on the host and copied to the device,
                  synchronously from pageable memory;
  transfers       host <-> device copies (aten._to_copy / copy_ between a CPU tensor and
                  another device), which only occur when a GPU is present.

`Tensor.tolist()` and `Tensor.numpy()` of a CPU tensor read its memory without an ATen
call (on a GPU they copy to the host first), so the audit also wraps these two methods
while it is active and records each call as a host read.

On a CPU-only machine every tensor is a CPU tensor, so "host reads" of tensors that stay
on the host in a GPU run (e.g. torch.optim's CPU step counters) would be counted too:
pass them as `host_tensors` and reads of their storage are not recorded.

    with SyncAudit(host_tensors=...) as audit:
        step()
    assert not audit.events, audit.report()
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_THIS_FILE = __file__.replace("\\", "/")

HOST_READ_OPS = frozenset({aten._local_scalar_dense.default})
DATA_DEPENDENT_SHAPE_OPS = frozenset({
    aten.nonzero.default, aten.nonzero.out, aten.nonzero_numpy.default, aten.argwhere.default,
    aten.masked_select.default, aten.masked_select.out,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
    aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor,
    aten._ctc_loss.default, aten.bincount.default, aten.histc.default,
})
HOST_DATA_OPS = frozenset({aten.lift_fresh.default, aten.lift_fresh_copy.default})
COPY_OPS = frozenset({aten._to_copy.default, aten.copy_.default, aten.to.device, aten.to.dtype_layout})
_HOST_READ_METHODS = ("tolist", "numpy")
BOOL_MASK_INDEX_OPS = frozenset({aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
                                 aten._index_put_impl_.default})


@dataclass
class SyncEvent:
    """One recorded operation: its kind, the ATen overload, and where Python called it."""

    kind: str
    op: str
    where: str


def _caller() -> str:
    """The innermost stack frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        name = frame.filename.replace("\\", "/")
        if "/torch/" not in name and name != _THIS_FILE:
            return f"{name}:{frame.lineno} {frame.line}"
    return "?"


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _crosses_host(func, args, kwargs) -> bool:
    """A copy between the host (CPU) and another device."""
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
        return (src.device.type == "cpu") != (dst.device.type == "cpu")
    device = kwargs.get("device")
    return device is not None and (args[0].device.type == "cpu") != (torch.device(device).type == "cpu")


class SyncAudit(TorchDispatchMode):
    """Records the host-synchronising operations run under it (see the module docstring)."""

    def __init__(self, host_tensors: list[torch.Tensor] = ()) -> None:
        super().__init__()
        self.host_storages = {t.untyped_storage().data_ptr() for t in host_tensors}
        self.events: list[SyncEvent] = []

    def _kind(self, func, args, kwargs) -> str | None:
        if func in HOST_READ_OPS:
            return None if args[0].untyped_storage().data_ptr() in self.host_storages else "host read"
        if func in DATA_DEPENDENT_SHAPE_OPS:
            return "data-dependent shape"
        if func in BOOL_MASK_INDEX_OPS and _has_bool_index(args):
            return "data-dependent shape"
        if func in HOST_DATA_OPS:
            return "tensor from host data"
        if func in COPY_OPS and _crosses_host(func, args, kwargs):
            return "host-device copy"
        return None

    def __enter__(self) -> "SyncAudit":
        self._saved_methods = {name: getattr(torch.Tensor, name) for name in _HOST_READ_METHODS}
        for name, method in self._saved_methods.items():
            setattr(torch.Tensor, name, self._recording(name, method))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, method in self._saved_methods.items():
                setattr(torch.Tensor, name, method)

    def _recording(self, name: str, method):
        audit = self

        def read_on_host(tensor, *args, **kwargs):
            if tensor.untyped_storage().data_ptr() not in audit.host_storages:
                audit.events.append(SyncEvent("host read", f"Tensor.{name}", _caller()))
            return method(tensor, *args, **kwargs)

        return read_on_host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = self._kind(func, args, kwargs)
        if kind is not None:
            self.events.append(SyncEvent(kind, str(func), _caller()))
        return func(*args, **kwargs)

    def report(self) -> str:
        return "\n".join(f"{e.kind}: {e.op} at {e.where}" for e in self.events) or "no synchronising operation"
