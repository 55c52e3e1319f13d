"""Host-side argument checks. They look at shapes, dtypes, devices and strides
only: no check may read a value out of a device tensor (that would
synchronize with the host and break CUDA graphs)."""

from __future__ import annotations

import numbers

import torch

from ._dtypes import ACT_DTYPES, FP8_DTYPES
HEAD_DIMS = (64, 128, 256)


def _fmt_dtypes(dtypes) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name, t, *, ndim=None, dtypes=None, device=None, shape=None,
                 last_contiguous=False, contiguous=False):
    """Raise ValueError naming ``name`` unless ``t`` is a tensor as described.

    ``shape`` is a tuple whose ``None`` entries match any size.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype {_fmt_dtypes(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor")
    if last_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected a unit stride in the last dimension, got strides {t.stride()}")
    return t


def check_head_dim(name, d):
    if d not in HEAD_DIMS:
        raise ValueError(f"{name}: head dim {d} is not supported; expected one of {HEAD_DIMS}")


def check_cache_dtype(name, cache, act_dtype):
    if cache.dtype != act_dtype and cache.dtype not in FP8_DTYPES:
        raise ValueError(
            f"{name}: expected dtype {_fmt_dtypes((act_dtype,) + FP8_DTYPES)} "
            f"(the activation dtype or fp8), got {str(cache.dtype).replace('torch.', '')}")


def normalize_scale(name, scale, cache, device):
    """A 1-element fp32 device tensor for fp8 caches, None otherwise.

    A float becomes a tensor with ``torch.full`` (a device fill, no host sync).
    """
    is_fp8 = cache.dtype in FP8_DTYPES
    if scale is None:
        if is_fp8:
            raise ValueError(f"{name}: required with an fp8 cache ({cache.dtype}); pass a float or a 1-element fp32 tensor")
        return None
    if not is_fp8:
        raise ValueError(f"{name}: only valid with an fp8 cache, but the cache dtype is {cache.dtype}")
    if isinstance(scale, torch.Tensor):
        check_tensor(name, scale, dtypes=(torch.float32,), device=device)
        if scale.numel() != 1:
            raise ValueError(f"{name}: expected a 1-element tensor, got shape {list(scale.shape)}")
        return scale.reshape(1)
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        if not scale > 0:
            raise ValueError(f"{name}: expected a positive scale, got {scale}")
        return torch.full((1,), float(scale), dtype=torch.float32, device=device)
    raise ValueError(f"{name}: expected a float or a 1-element fp32 tensor, got {type(scale).__name__}")


def check_int(name, value, *, minimum=None, allow_none=False):
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name}: expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def check_float(name, value, *, positive=False):
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name}: expected a float, got {type(value).__name__}")
    if positive and not value > 0:
        raise ValueError(f"{name}: expected a positive float, got {value}")
    return float(value)
