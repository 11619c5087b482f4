"""Counts, on a CPU-only machine, what would make the host wait for a CUDA device.

On CUDA the host runs ahead of the GPU only as long as nothing reads device memory back or copies
into the device from pageable memory with ``non_blocking=False``. On CPU both sides are the same
memory, so we track which tensors *would* live on the device ("device tensors") and report every
operation that, on CUDA, would block the host:

* reads of device values: ``_local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``, ``int(t)``,
  f-strings), ``is_nonzero``, ``equal``, and ``.cpu()`` / ``.tolist()`` / ``.numpy()`` of a device
  tensor;
* ops whose output shape depends on device data, so CUDA must copy a size back before it can
  allocate the result: ``nonzero`` (also ``torch.where(cond)``, ``argwhere``), ``bincount``,
  ``masked_select``, ``unique*``, ``repeat_interleave`` without ``output_size``, boolean-mask
  indexing (``x[mask]``, ``x[mask] = v``), ``histc``;
* blocking host-to-device copies: ``t.to(device)`` / ``t.copy_(...)`` of a host tensor without
  ``non_blocking=True`` and ``torch.tensor(data, device=...)``: torch follows these with
  ``cudaStreamSynchronize`` (``memcpy_and_sync``), the same wait ``set_sync_debug_mode`` reports.

Device tensors are the ones handed to :meth:`HostSyncCounter.mark` (a batch from stage 1, the
model's parameters and buffers), tensors made by a factory call with an explicit ``device=``
(``torch.zeros(..., device=x.device)``), and everything computed from a device tensor (tracked at
the dispatcher, so autograd's backward and the optimizer's in-place updates are followed too).
Host-side work on CPU tensors (per-sample random draws, index lists) is not counted: on CUDA it
stays on the host.

A host tensor moved with ``.to(device)`` is replaced by a copy, so the host tensor itself stays a
host tensor (on CPU ``.to`` would otherwise return the same object).

Known blind spot: ``t.to(torch.device("cpu"))`` of a device tensor is taken as a no-op move (on CPU
it cannot be told from ``t.to(x.device)``); reading the result (``.tolist()``, ``float``) is still
counted, and ``.cpu()`` and ``.to("cpu")`` are counted.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten

# Reading a device value on the host.
_SCALAR_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
# Output shapes that depend on device data (CUDA copies a count back first).
_DATA_DEPENDENT = {"nonzero", "argwhere", "bincount", "masked_select", "unique_dim", "_unique", "_unique2",
                   "unique_consecutive", "unique_dim_consecutive", "histc", "nonzero_numpy"}
_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.linspace, torch.rand,
              torch.randn, torch.randint, torch.randperm, torch.eye, torch.empty_strided, torch.tensor,
              torch.as_tensor, torch.scalar_tensor}
_COPYING_FACTORIES = {torch.tensor, torch.as_tensor}
_HOST_READS = {"tolist", "numpy", "cpu", "__array__"}


class HostSyncCounter:
    """``with HostSyncCounter() as c: c.mark(batch, *model.parameters()); step()`` then
    ``c.events`` lists ``(label, kind, what)``; set ``c.label`` (e.g. the step number) to attribute
    events. Kinds: ``read`` (device value read on the host), ``shape`` (data-dependent output
    shape), ``h2d`` (blocking host-to-device copy)."""

    def __init__(self):
        self._device = WeakTensorKeyDictionary()
        self.events: list[tuple[Any, str, str]] = []
        self.label: Any = None
        self.ops = 0  # every aten op dispatched
        self.device_ops = 0  # aten ops with a device tensor argument: kernel launches on a GPU
        self._fn = _FunctionLevel(self)
        self._dispatch = _DispatchLevel(self)

    # -- marking
    def mark(self, *tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._device[t] = True

    def is_device(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t in self._device

    def _record(self, kind: str, what: str) -> None:
        self.events.append((self.label, kind, what))

    # -- results
    def count(self, label: Any = ..., kind: str | None = None) -> int:
        return sum(1 for lab, k, _ in self.events if (label is ... or lab == label) and (kind is None or k == kind))

    def summary(self, label: Any = ...) -> Counter:
        return Counter(f"{k}:{w}" for lab, k, w in self.events if label is ... or lab == label)

    def __enter__(self):
        self._fn.__enter__()
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc):
        self._dispatch.__exit__(*exc)
        self._fn.__exit__(*exc)


def _target_device(args, kwargs) -> tuple[bool, bool]:
    """For ``Tensor.to(...)``: (names a device, names the host literally as "cpu")."""
    candidates = list(args[1:]) + [kwargs.get("device")]
    for a in candidates:
        if isinstance(a, str):
            return True, a == "cpu"
        if isinstance(a, torch.device):
            return True, False
        if isinstance(a, torch.Tensor):
            return True, False
    return False, False


class _FunctionLevel(TorchFunctionMode):
    """Python-level calls that never reach the dispatcher on CPU: moves, host reads, factories."""

    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.c = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        name = getattr(func, "__name__", "")
        src = args[0] if args else None
        if name in _HOST_READS and c.is_device(src):
            c._record("read", f".{name}()")
        if name == "to" and isinstance(src, torch.Tensor):
            names_device, literal_cpu = _target_device(args, kwargs)
            out = func(*args, **kwargs)
            if c.is_device(src):
                if literal_cpu:
                    c._record("read", ".to('cpu')")
                    return out
                c.mark(out)
                return out
            if names_device and not literal_cpu:
                target = next((a for a in list(args[1:]) + [kwargs.get("device")] if isinstance(a, torch.Tensor)), None)
                if target is None or c.is_device(target):
                    if not kwargs.get("non_blocking", False):
                        c._record("h2d", "Tensor.to(device) without non_blocking")
                    out = out.clone() if out is src else out
                    c.mark(out)
            return out
        if name == "copy_" and isinstance(src, torch.Tensor) and len(args) > 1:
            dst_dev, src_dev = c.is_device(src), c.is_device(args[1])
            if dst_dev and not src_dev and args[1].numel() > 1 and not kwargs.get("non_blocking", False):
                c._record("h2d", "device.copy_(host) without non_blocking")
            if src_dev and not dst_dev and not kwargs.get("non_blocking", False):
                c._record("read", "host.copy_(device)")
        out = func(*args, **kwargs)
        if func in _FACTORIES and kwargs.get("device") is not None:
            data = args[0] if args else None
            if func in _COPYING_FACTORIES and not c.is_device(data):
                c._record("h2d", f"torch.{name}(host data, device=...)")
            c.mark(out)
        return out


class _DispatchLevel(TorchDispatchMode):
    """Every aten op, including autograd's backward and optimizer internals: device tensors are
    followed through every op, and the syncing ops among them are recorded."""

    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        c.ops += 1
        flat, _ = tree_flatten((args, kwargs))
        on_device = any(c.is_device(a) for a in flat)
        c.device_ops += on_device
        if on_device:
            base = func.overloadpacket.__name__
            if func in _SCALAR_READS:
                c._record("read", str(func))
            elif base in _DATA_DEPENDENT:
                c._record("shape", base)
            elif base == "repeat_interleave" and kwargs.get("output_size") is None:
                c._record("shape", base)
            elif base in ("index", "index_put", "index_put_", "_index_put_impl_") and _bool_index(args):
                c._record("shape", f"{base} with a boolean mask")
        out = func(*args, **kwargs)
        if on_device:
            inputs = {id(a) for a in flat if isinstance(a, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and id(t) not in inputs:
                    c.mark(t)
        return out


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else None
    if not isinstance(indices, (list, tuple)):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
