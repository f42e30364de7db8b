"""A stand-in for a second device on a CPU-only machine, to test device-agnostic code.

`on_device(t)` returns a view of a CPU tensor that claims to live on `cuda:0`
(`Elsewhere`). Inside `FakeCuda()` (a TorchFunctionMode) every torch call is checked with
CUDA's rules and its results are placed as CUDA would place them:

* an operation may not mix a tensor "on cuda" with a CPU tensor of one or more dimensions
  (0-dim CPU tensors are scalars and allowed, as on CUDA); a CPU tensor may not be indexed
  with "cuda" indices (a "cuda" tensor may be indexed with CPU ones); `.numpy()` and
  `np.asarray` of a "cuda" tensor are errors; random draws with a CPU `torch.Generator`
  into a "cuda" tensor are errors;
* `t.device` of a "cuda" tensor is `cuda:0`; factories given `device=cuda` (or
  `device=x.device` of a "cuda" x), `.to(cuda)`, `.cuda()` and every result of an operation
  on "cuda" tensors are "cuda"; `.cpu()`, `.to("cpu")` bring a tensor back.

The data never leave the CPU, so a computation gives the same numbers as on the CPU: a
device-agnostic function returns identical results with its inputs "on cuda" and raises
`DeviceMixError` where real CUDA would raise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

FAKE = torch.device("cuda", 0)
CPU = torch.device("cpu")


class DeviceMixError(AssertionError):
    """What real CUDA would refuse."""


class Elsewhere(torch.Tensor):
    """A CPU tensor that claims to be on cuda:0 (while FakeCuda is active)."""

    __torch_function__ = torch._C._disabled_torch_function_impl


def on_device(t: torch.Tensor) -> torch.Tensor:
    return t if isinstance(t, Elsewhere) else t.as_subclass(Elsewhere)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor) if isinstance(t, Elsewhere) else t


def _where(x: Any) -> torch.device | None:
    """The device a device-like argument names (a tensor: where it claims to be)."""
    if isinstance(x, Elsewhere):
        return FAKE
    if isinstance(x, torch.Tensor):
        return CPU
    if isinstance(x, torch.device):
        return x
    if isinstance(x, str):
        try:
            return torch.device(x)
        except RuntimeError:
            return None
    if isinstance(x, int) and not isinstance(x, bool):
        return torch.device("cuda", x)
    return None


def _is_fake(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda"


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _retag(ret: Any, fake: bool) -> Any:
    if isinstance(ret, torch.Tensor):
        return on_device(ret) if fake else _plain(ret)
    if isinstance(ret, tuple) and not isinstance(ret, torch.Size):
        items = [_retag(r, fake) for r in ret]
        try:
            return type(ret)(items)  # torch.return_types (values, indices), ...
        except TypeError:
            return tuple(items)
    if isinstance(ret, list):
        return [_retag(r, fake) for r in ret]
    return ret


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or str(func)


class FakeCuda(TorchFunctionMode):
    """Check every torch call against CUDA's device rules (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0  # operations that saw a "cuda" tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        T = torch.Tensor
        if func == T.device.__get__:  # (a new method-wrapper per access: ==)
            return FAKE if isinstance(args[0], Elsewhere) else func(*args)
        if func == T.is_cuda.__get__:
            return isinstance(args[0], Elsewhere)
        if func == T.grad.__get__:
            g = func(*args)
            return on_device(g) if g is not None and isinstance(args[0], Elsewhere) else g
        if func in (T.numpy, T.__array__):
            if isinstance(args[0], Elsewhere):
                raise DeviceMixError("can't convert a cuda tensor to numpy: use .cpu() first")
            return func(*args, **kwargs)
        if func == T.cpu:
            return _plain(func(*args, **kwargs))
        if func == T.cuda:
            return on_device(func(_plain(args[0])))
        if func == T.to:
            return self._to(func, args, kwargs)
        if func == T.copy_:  # a copy may cross devices
            return func(*args, **kwargs)
        if func == T.__getitem__:
            return self._getitem(func, args)
        if func == T.__setitem__:
            return self._setitem(func, args)

        target = _where(kwargs["device"]) if "device" in kwargs else None
        if target is not None:
            kwargs["device"] = CPU if _is_fake(target) else kwargs["device"]
        gen = kwargs.get("generator")
        if _is_fake(target) and gen is not None and gen.device.type != "cuda":
            raise DeviceMixError(f"{_name(func)}: a CPU generator cannot draw on cuda "
                                 "(draw on the CPU, then move)")
        ts = _tensors((args, kwargs))
        fake_in = any(isinstance(t, Elsewhere) for t in ts)
        cpu_in = [t for t in ts if not isinstance(t, Elsewhere) and t.dim() > 0]
        if fake_in and cpu_in:
            raise DeviceMixError(f"{_name(func)}: expected all tensors to be on the same "
                                 f"device, but found cuda:0 and cpu (shape "
                                 f"{tuple(cpu_in[0].shape)})")
        if fake_in and gen is not None and gen.device.type != "cuda" and target is None:
            raise DeviceMixError(f"{_name(func)}: a CPU generator cannot draw on cuda")
        if fake_in:
            self.calls += 1
        ret = func(*args, **kwargs)
        if args and ret is args[0]:  # in place: the tensor stays where it is
            return ret
        fake_out = _is_fake(target) if target is not None else fake_in
        return _retag(ret, fake_out)

    def _to(self, func, args, kwargs):
        self_t = args[0]
        target = None
        for a in (*args[1:], kwargs.get("device"), kwargs.get("other")):
            d = _where(a)
            if d is not None:
                target = d
                break
        rest = [a for a in args[1:] if _where(a) is None]
        kw = {k: v for k, v in kwargs.items() if k not in ("device", "other")}
        ret = func(_plain(self_t), *rest, **kw)
        fake = _is_fake(target) if target is not None else isinstance(self_t, Elsewhere)
        if fake == isinstance(self_t, Elsewhere) and ret is _plain(self_t):
            return self_t  # already there: .to returns the tensor itself
        return _retag(ret, fake)

    @staticmethod
    def _check_index(func, self_t, index):
        if not isinstance(self_t, Elsewhere) and any(
                isinstance(t, Elsewhere) for t in _tensors(index)):
            raise DeviceMixError(f"{_name(func)}: indices should be either on cpu or on the "
                                 "same device as the indexed tensor (cpu)")

    def _getitem(self, func, args):
        self_t, index = args
        self._check_index(func, self_t, index)
        ret = func(*args)
        return _retag(ret, isinstance(self_t, Elsewhere))

    def _setitem(self, func, args):
        self_t, index, value = args
        self._check_index(func, self_t, index)
        if (isinstance(value, torch.Tensor) and value.dim() > 0
                and isinstance(value, Elsewhere) != isinstance(self_t, Elsewhere)):
            raise DeviceMixError(f"{_name(func)}: value on another device than the tensor")
        return func(*args)
