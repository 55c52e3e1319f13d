"""Host-side argument checks. They look at shapes, dtypes, devices and strides
only: no check may read a value out of a device tensor (that would
synchronize with the host and break CUDA graphs)."""

from __future__ import annotations

import math
import numbers

import torch

from ._dtypes import ACT_DTYPES, FP8_DTYPES
HEAD_DIMS = (64, 128, 256)


def _fmt_dtypes(dtypes) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name, t, *, ndim=None, dtypes=None, device=None, shape=None,
                 last_contiguous=False, contiguous=False):
    """Raise ValueError naming ``name`` unless ``t`` is a tensor as described.

    ``shape`` is a tuple whose ``None`` entries match any size. Every call of
    every op runs these checks, so the passing path reads each attribute once
    and builds no message.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    size = t.shape
    if ndim is not None and len(size) != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(size)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype {_fmt_dtypes(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if shape is not None and size != shape and not _matches(size, shape):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(size)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor")
    if last_contiguous and size and size[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected a unit stride in the last dimension, got strides {t.stride()}")
    return t


def check_vector(name, t, dtype, n, device, *, contiguous=False):
    """:func:`check_tensor` for a 1-D ``[n]`` vector of one dtype (the
    per-request and per-token inputs): the passing path in a third of the time."""
    if (isinstance(t, torch.Tensor) and t.dtype is dtype and t.shape == (n,) and t.device == device
            and (not contiguous or t.is_contiguous())):
        return t
    return check_tensor(name, t, dtypes=(dtype,), device=device, shape=(n,), contiguous=contiguous)


def _matches(size, shape) -> bool:
    if len(size) != len(shape):
        return False
    for want, got in zip(shape, size):
        if want is not None and want != got:
            return False
    return True


def check_head_dim(name, d):
    if d not in HEAD_DIMS:
        raise ValueError(f"{name}: head dim {d} is not supported; expected one of {HEAD_DIMS}")


def check_cache_dtype(name, cache, act_dtype):
    if cache.dtype != act_dtype and cache.dtype not in FP8_DTYPES:
        raise ValueError(
            f"{name}: expected dtype {_fmt_dtypes((act_dtype,) + FP8_DTYPES)} "
            f"(the activation dtype or fp8), got {str(cache.dtype).replace('torch.', '')}")


def check_scale(name, scale, cache, device):
    """Check an fp8 scale argument (a float or a 1-element fp32 tensor, required
    exactly when ``cache`` is fp8); returns the tensor it is, else None (what the
    overlap checks see; :func:`scale_tensor` makes the kernels' form)."""
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
        return scale
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        check_float(name, scale, positive=True)
        return None
    raise ValueError(f"{name}: expected a float or a 1-element fp32 tensor, got {type(scale).__name__}")


def scale_tensor(scale, device):
    """The kernels' form of a scale :func:`check_scale` accepted: None, or a
    1-element fp32 tensor. A float becomes one with ``torch.full`` (a device
    fill) once per value, device and stream (``_fastpath.kept``): kernels only
    read it, so eager calls share it and a call plan may hold it."""
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor):
        return scale.reshape(1)
    from . import _fastpath

    value = float(scale)
    return _fastpath.kept(("scale", value), device, lambda: torch.full(
        (1,), value, dtype=torch.float32, device=device))


def check_int(name, value, *, minimum=None):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name}: expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


FP32_MAX = 3.4028234663852886e38
FP32_MIN_NORMAL = 2.0 ** -126


def check_float(name, value, *, positive=False):
    """A Python float that is finite in fp32 (the kernels' type); with
    ``positive``, a normal positive fp32 number (a value that would round to
    0 or a denormal in fp32, which kernels may flush, is refused too)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name}: expected a float, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name}: expected a float finite in fp32, got an int of "
                         f"{int(value).bit_length()} bits") from None
    if not (math.isfinite(value) and abs(value) <= FP32_MAX):
        raise ValueError(f"{name}: expected a float finite in fp32, got {value}")
    if positive and not value >= FP32_MIN_NORMAL:
        raise ValueError(f"{name}: expected a positive float (a normal fp32 number, "
                         f">= {FP32_MIN_NORMAL:.3g}), got {value}")
    return value


# --------------------------------------------------------------------------
# Memory overlap (aliasing) between the tensors an op writes and the others.
# Decided from data pointers, sizes and strides only (no device access).
# --------------------------------------------------------------------------

def _extent(t):
    """``(first byte, one past the last byte)`` that ``t`` can touch, or None when empty."""
    numel = t.numel()
    if numel == 0:
        return None
    lo = t.data_ptr()
    esize = t.element_size()
    if t.is_contiguous():
        return lo, lo + numel * esize
    span = 0
    for n, s in zip(t.shape, t.stride()):
        span += (n - 1) * s
    return lo, lo + span * esize + esize


def _dims(t):
    """``(stride, size)`` in bytes/elements of the dims with size > 1, largest stride first."""
    esize = t.element_size()
    return sorted(((s * esize, n) for n, s in zip(t.shape, t.stride()) if n > 1), reverse=True)


def _nested(dims) -> bool:
    """Each stride reaches past everything the smaller ones span: every element
    has one address and the greedy decomposition below is exact."""
    reach = 0
    for stride, n in reversed(dims):
        if stride <= reach:
            return False
        reach += (n - 1) * stride
    return True


def _has_internal_overlap(t) -> bool:
    """Two indices of ``t`` with one address (a stride-0 expansion, overlapping
    as_strided pages). Conservative for layouts that are not nested."""
    return t.numel() > 1 and not t.is_contiguous() and not _nested(_dims(t))


def _share_memory(a, b, ea, eb) -> bool:
    """Whether some byte of ``a`` is a byte of ``b`` (their extents intersect)."""
    if a.element_size() == b.element_size() and a.shape == b.shape and a.stride() == b.stride():
        dims = _dims(a)
        if _nested(dims):
            # b is a translated by d bytes: they share memory iff d (or less
            # than an element of it) is a sum of in-range steps of a's dims.
            d = abs(eb[0] - ea[0])
            for stride, n in dims:
                d -= min(d // stride, n - 1) * stride
            return d < a.element_size()
    rows = _row_window(a, b, ea, eb)
    if rows is not None:
        return rows
    return True  # other layouts: the intersecting extents count as overlap


def _row_window(a, b, ea, eb):
    """Column slices of one row-major buffer (q and k as views of a fused qkv
    projection): both have the same outermost stride R and each row's bytes fit
    in a window narrower than R; they share memory iff the windows intersect
    modulo R. None when the layouts are not of that kind."""
    da, db = _dims(a), _dims(b)
    if not da or not db or da[0][0] != db[0][0] or not (_nested(da) and _nested(db)):
        return None
    R = da[0][0]
    wa = sum((n - 1) * st for st, n in da[1:]) + a.element_size()
    wb = sum((n - 1) * st for st, n in db[1:]) + b.element_size()
    if wa > R or wb > R:
        return None
    lo, hi, w_lo, w_hi = (ea[0], eb[0], wa, wb) if ea[0] <= eb[0] else (eb[0], ea[0], wb, wa)
    d = (hi - lo) % R
    return not (d >= w_lo and d + w_hi <= R)


def check_no_overlap(written, read=()):
    """Raise ValueError naming both tensors when a tensor an op writes shares
    memory with itself (two indices, one address), with another written tensor,
    or with a tensor it reads. ``written``, ``read``: sequences of
    ``(name, tensor or None)``.

    Skipped while torch.compile traces (fake tensors have no addresses): the
    eager call of the same code is where aliasing is caught."""
    if torch.compiler.is_compiling():
        return
    spans = []
    for is_written, group in ((True, written), (False, read)):
        for name, t in group:
            if t is None:
                continue
            extent = _extent(t)
            if extent is None:
                continue
            if is_written and _has_internal_overlap(t):
                raise ValueError(f"{name}: the op writes it, but two of its elements share memory "
                                 f"(shape {list(t.shape)}, strides {t.stride()})")
            spans.append((extent, is_written, name, t))
    spans.sort(key=lambda s: s[0][0])
    for i, (ea, wa, na, ta) in enumerate(spans):
        for eb, wb, nb, tb in spans[i + 1:]:
            if eb[0] >= ea[1]:
                break
            if (wa or wb) and _share_memory(ta, tb, ea, eb):
                what = "both are written" if wa and wb else "one is written while the other is read"
                raise ValueError(f"{na}, {nb}: they share memory and {what} by the op; "
                                 f"pass separate tensors")
