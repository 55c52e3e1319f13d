"""Host fast path of the public ops (docs/DESIGN.md, "Host fast path").

A public op validates its arguments in Python (ops.py and _validation.py: the
contract and its ValueErrors) the first time it sees a layout, then remembers
the layout in the extension (csrc/bindings/fastpath.cpp). A later call with the
same layout (every tensor's dtype, device, sizes, strides and 16-byte alignment,
every list's length, every scalar's value) skips the Python checks when no tensor
the op writes shares a byte with another argument; anything else, or any doubt,
takes the Python path. Outputs are allocated in one extension call.

Call plans: the first dense call of a remembered layout also records how the
Python path turned the arguments into the backend's call: which backend function,
each of its arguments as an item, an item's element, a new output, a view of an
item or a constant, and the result in the same terms (:func:`record`, from
``ops._run``). The signature fixes every value that construction reads, so a
later call of the layout runs the plan in the extension (outputs, arguments, the
backend call, the result) without the public function's Python. A call whose
construction is anything else (a copy, a tensor made per call) is not planned.
Plans never run under the profiler, a dispatch mode, the JIT tracer or
torch.compile, nor when the backend environment variables changed since the
plan was recorded. ``DFLASH_KERNELS_NO_CALL_PLANS=1`` switches plans off.

Without the extension (a pure-Python install, the NVRTC path), or with
``DFLASH_KERNELS_NO_FASTPATH=1``, every call takes the Python path. While
torch.compile traces, the Python path runs too (dynamo traces it once per graph).
"""

from __future__ import annotations

import os
from threading import get_ident

import torch
from torch.autograd import profiler as _profiler

ENV = "DFLASH_KERNELS_NO_FASTPATH"

# One slot per op in the extension's table of remembered layouts.
OPS = {name: i for i, name in enumerate(
    ("block_attention", "fuse_target_features", "inject_kv", "write_kv", "verify_chain"))}

KIND_LIKE, KIND_INT32, KIND_FLOAT32 = 0, 1, 2
# fast_check's answer for a dense remembered layout whose plan did not run.
PLANNED = 2


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
PLANS = ENABLED and (os.environ.get("DFLASH_KERNELS_NO_CALL_PLANS") or "0") == "0"
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


def validate(op: int, written: int, items: tuple, check_fn, backend=None):
    """Validate a call: ``check_fn(*items)`` (the op's Python checks, raising
    ValueError) unless the extension recognises a layout they passed before
    (``backend``, the call's backend argument, is part of the layout).

    Returns None when the Python checks ran; True when the layout was recognised
    and every tensor is dense (this call may record the layout's plan); False when
    recognised with a strided tensor (the caller makes its small inputs dense as on
    the Python path); ``PLANNED`` when recognised and dense but its plan did not
    run; a 1-tuple ``(result,)`` when the plan ran: the op returns ``result``."""
    global _PENDING
    _PENDING = None         # a call that returned before ops._run records nothing later
    if _C is None or _is_compiling():
        check_fn(*items)
        return None
    replay = PLANS and not _profiler._is_profiler_enabled
    if VERIFY and _C.fast_check(op, written, items, backend) is not None:
        try:
            check_fn(*items)
        except ValueError as exc:
            raise AssertionError(f"the host fast path let through a call its Python checks "
                                 f"refuse: {exc}") from exc
    fast = _C.fast_check(op, written, items, backend, replay)
    if fast is None:
        check_fn(*items)
        if _C.fast_accept(op, written, items, backend) and replay:
            _PENDING = (get_ident(), op, written, items, backend, [])
    elif fast is True and replay:
        _PENDING = (get_ident(), op, written, items, backend, [])
    return fast


def empty(like, kind: int, *shapes):
    """New contiguous tensors on ``like``'s device (``KIND_*`` dtype), in one call."""
    if _C is None or _is_compiling():
        return tuple(_empty_py(like, kind, s) for s in shapes)
    outs = _C.empty(like, kind, *shapes)
    if _PENDING is not None and _PENDING[0] == get_ident():
        _PENDING[5].extend((like, kind, shape, t) for shape, t in zip(shapes, outs))
    return outs


def forget(plans_only: bool = False) -> None:
    """Drop every remembered layout, or only their call plans (whatever the
    plans captured, such as the backend function, changed: tests, benchmarks,
    ``ops.set_nvtx``)."""
    global _PENDING
    _PENDING = None
    if _C is not None:
        _C.fast_forget(plans_only)


# ---------------------------------------------------------------- call plans

# (thread, op, written, items, backend, outputs made so far): the call that may
# record its layout's plan when it reaches ops._run on the same thread.
_PENDING = None
# Tensors the public layer keeps and never writes (:func:`kept`): a plan may hold
# them as constants.
_CONSTANTS: dict = {}
_KEPT: dict = {}
_MAX_KEPT = 4096


def kept(key, device: torch.device, make) -> torch.Tensor:
    """The tensor ``make()`` builds from host values only (``key`` names them),
    made once per device and, on CUDA, per current stream, then kept and never
    written: its fill runs on the stream of its first use, so a use from
    another stream gets its own (no stream waits on another). Made during CUDA
    graph capture it is not kept (its fill would only run on replay)."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return make()
        full_key = (key, device, torch.cuda.current_stream(device).cuda_stream)
    else:
        full_key = (key, device)
    t = _KEPT.get(full_key)
    if t is None:
        t = make()
        if len(_KEPT) < _MAX_KEPT:
            _KEPT[full_key] = t
            _CONSTANTS[id(t)] = t
    return t


def record(op: int, fn, args: tuple, result) -> None:
    """Called by ``ops._run`` just before the eager backend call ``fn(*args)``
    whose public function returns ``result``: gives the pending layout its call
    plan (None when the call cannot be described, so it is not tried again)."""
    global _PENDING
    pending, _PENDING = _PENDING, None
    if pending is None or pending[0] != get_ident() or pending[1] != op:
        return
    _, op, written, items, backend, outs = pending
    if any(isinstance(t, torch.Tensor) and t.is_cuda for t in items) and \
            torch.cuda.is_current_stream_capturing():
        return          # constants made under capture hold values only after replay: later
    _C.fast_plan(op, written, items, backend, _plan(fn, items, outs, args, result))


_SCALARS = (type(None), bool, int, float, str)
_NOT_PLANNABLE = object()


def _plan(fn, items, outs, args, result):
    """The plan tuple fastpath.cpp runs (its descriptor kinds are described
    there), or None."""
    from . import _registry

    sources = {}       # id -> descriptor; _NOT_PLANNABLE when two sources share an object

    def note(obj, desc):
        sources[id(obj)] = _NOT_PLANNABLE if id(obj) in sources else desc

    tensors = []       # (item tensor, its descriptor): what a view may alias
    for i, it in enumerate(items):
        if isinstance(it, torch.Tensor):
            note(it, (1, i))
            tensors.append((it, (1, i)))
        elif isinstance(it, (list, tuple)):
            note(it, (1, i))
            for j, e in enumerate(it):
                if isinstance(e, torch.Tensor):
                    note(e, (2, i, j))
                    tensors.append((e, (2, i, j)))
    specs = []
    out_dev = None
    for j, (like, kind, shape, t) in enumerate(outs):
        like_desc = sources.get(id(like))
        if like_desc is None or like_desc is _NOT_PLANNABLE or like.device != (out_dev or like.device):
            return None
        out_dev = like.device
        note(t, (4, j))
        specs.append((like_desc, kind, tuple(shape)))

    cuda_constants = []

    def constant(t):
        if t.is_cuda:
            cuda_constants.append(t)
        return (0, t)

    def describe(obj):
        if type(obj) in _SCALARS:
            return (0, obj)
        desc = sources.get(id(obj))
        if desc is not None:
            if desc is _NOT_PLANNABLE or id(obj) in _CONSTANTS:
                raise LookupError
            return desc
        if isinstance(obj, torch.Tensor):
            if _CONSTANTS.get(id(obj)) is obj:
                return constant(obj)
            views = [d for t, d in tensors if t.data_ptr() == obj.data_ptr() and
                     t.dtype == obj.dtype and t.device == obj.device]
            if len(views) == 1 and views[0][0] == 1 and type(obj) is torch.Tensor:
                return (5, views[0][1], tuple(obj.shape), tuple(obj.stride()))
            raise LookupError
        if type(obj) is list:
            return (3, tuple(describe(e) for e in obj))
        if type(obj) is tuple or (isinstance(obj, tuple) and hasattr(type(obj), "_fields")):
            # a namedtuple: fastpath.cpp makes it with tuple.__new__, as its __new__ does
            return (6, None if type(obj) is tuple else type(obj), tuple(describe(e) for e in obj))
        raise LookupError

    try:
        arg_descs = tuple(describe(a) for a in args)
        result_desc = describe(result)
    except LookupError:
        return None
    # A kept CUDA constant belongs to the stream it was made on (kept()): the plan
    # runs only while that stream is current.
    stream = None
    if cuda_constants:
        devices = {t.device for t in cuda_constants}
        if len(devices) != 1:
            return None
        (dev,) = devices
        stream = (dev.index, torch.cuda.current_stream(dev).cuda_stream)
    return (fn, _registry._getenv(_registry.ENV_VAR), _registry._getenv("TRITON_INTERPRET"),
            arg_descs, tuple(specs), result_desc, stream)


_KIND_DTYPES = {KIND_INT32: torch.int32, KIND_FLOAT32: torch.float32}


def _empty_py(like, kind, shape):
    return torch.empty(shape, dtype=_KIND_DTYPES.get(kind, like.dtype), device=like.device)
