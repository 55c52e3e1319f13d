"""Host fast path of the public ops (docs/DESIGN.md, "Host fast path").

A public op validates its arguments in Python (ops.py and _validation.py: the
contract and its ValueErrors) the first time it sees a layout, then remembers
the layout in the extension (csrc/bindings/fastpath.cpp). A later call with the
same layout (every tensor's dtype, device, sizes, strides and 16-byte alignment,
every list's length, every scalar's value) skips the Python checks when no tensor
the op writes shares a byte with another argument; anything else, or any doubt,
takes the Python path. Outputs are allocated in one extension call.

Without the extension (a pure-Python install, the NVRTC path), or with
``DFLASH_KERNELS_NO_FASTPATH=1``, every call takes the Python path. While
torch.compile traces, the Python path runs too (dynamo traces it once per graph).
"""

from __future__ import annotations

import os

import torch

ENV = "DFLASH_KERNELS_NO_FASTPATH"

# One slot per op in the extension's table of remembered layouts.
OPS = {name: i for i, name in enumerate(
    ("block_attention", "fuse_target_features", "inject_kv", "write_kv", "verify_chain"))}

KIND_LIKE, KIND_INT32, KIND_FLOAT32 = 0, 1, 2


def _load():
    if (os.environ.get(ENV) or "0") != "0":
        return None
    try:
        from . import _C
    except (ImportError, OSError):
        return None
    return _C if hasattr(_C, "fast_check") else None


_C = _load()
ENABLED = _C is not None
_is_compiling = torch.compiler.is_compiling


def written_mask(*indices: int) -> int:
    """The ``written`` argument: bit i set for item i that the op writes."""
    mask = 0
    for i in indices:
        mask |= 1 << i
    return mask


# Tests set this: a call the fast path lets through also runs the Python checks,
# and a ValueError from them is a fast-path bug (AssertionError).
VERIFY = (os.environ.get("DFLASH_KERNELS_FASTPATH_VERIFY") or "0") != "0"


def validate(op: int, written: int, items: tuple, check_fn):
    """Validate a call: ``check_fn(*items)`` (the op's Python checks, raising
    ValueError) unless the extension recognises a layout they passed before.

    Returns None when the Python checks ran; True when the layout was recognised
    and every tensor is dense; False when recognised with a strided tensor (the
    caller makes its small inputs dense as on the Python path)."""
    if _C is None or _is_compiling():
        check_fn(*items)
        return None
    fast = _C.fast_check(op, written, items)
    if fast is None:
        check_fn(*items)
        _C.fast_accept(op, written, items)
    elif VERIFY:
        try:
            check_fn(*items)
        except ValueError as exc:
            raise AssertionError(f"the host fast path let through a call its Python checks "
                                 f"refuse: {exc}") from exc
    return fast


def empty(like, kind: int, *shapes):
    """New contiguous tensors on ``like``'s device (``KIND_*`` dtype), in one call."""
    if _C is None or _is_compiling():
        return tuple(_empty_py(like, kind, s) for s in shapes)
    return _C.empty(like, kind, *shapes)


def forget() -> None:
    """Drop every remembered layout (tests)."""
    if _C is not None:
        _C.fast_forget()


_KIND_DTYPES = {KIND_INT32: torch.int32, KIND_FLOAT32: torch.float32}


def _empty_py(like, kind, shape):
    return torch.empty(shape, dtype=_KIND_DTYPES.get(kind, like.dtype), device=like.device)
