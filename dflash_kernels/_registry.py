"""The one place that knows which backends exist and picks one.

Each op has up to three implementations with one signature (docs/DESIGN.md):
``cuda`` (the compiled extension), ``triton`` and ``reference``. The choice,
in order of precedence: the ``backend=`` argument of a call, the environment
variable ``DFLASH_KERNELS_BACKEND``, then the best available for the device
(cuda, then triton on CUDA tensors, then reference).
"""

from __future__ import annotations

import functools
import importlib
import os

BACKENDS = ("cuda", "triton", "reference")

OPS = ("block_attention", "fuse_target_features", "inject_kv", "write_kv", "verify_chain",
       "tree_mask", "verify_tree", "copy_kv")

# op -> backend -> module holding a function named like the op.
_MODULES = {
    "block_attention": {
        "reference": "dflash_kernels.reference.block_attention",
        "triton": "dflash_kernels.triton_backend.block_attention",
    },
    "fuse_target_features": {
        "reference": "dflash_kernels.reference.inject",
        "triton": "dflash_kernels.triton_backend.inject",
    },
    "inject_kv": {
        "reference": "dflash_kernels.reference.inject",
        "triton": "dflash_kernels.triton_backend.inject",
    },
    "write_kv": {
        "reference": "dflash_kernels.reference.inject",
        "triton": "dflash_kernels.triton_backend.inject",
        "cuda": "dflash_kernels.cuda",
    },
    "verify_chain": {
        "reference": "dflash_kernels.reference.verify_chain",
        "triton": "dflash_kernels.triton_backend.verify_chain",
        "cuda": "dflash_kernels.cuda",
    },
    # Trees (tree_ops.py): one module per op and backend.
    **{op: {"reference": f"dflash_kernels.reference.{op}",
            "triton": f"dflash_kernels.triton_backend.{op}"}
       for op in ("tree_mask", "verify_tree", "copy_kv")},
}

ENV_VAR = "DFLASH_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """Raised when a backend that was asked for cannot run the call."""


@functools.lru_cache(maxsize=None)
def _load(op: str, backend: str):
    """The implementation of ``op`` in ``backend``, or the reason it is missing."""
    module_name = _MODULES[op].get(backend)
    if module_name is None:
        return None, f"the {backend} backend has no implementation of {op}"
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or a missing compiled extension
        return None, f"{module_name} could not be imported ({type(exc).__name__}: {exc})"
    fn = getattr(module, op, None)
    if fn is None:
        return None, f"{module_name} does not define {op}"
    return fn, ""


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _device_reason(backend: str, device_type: str) -> str:
    """Empty when ``backend`` can run on ``device_type``, else why not."""
    if backend == "reference":
        return ""
    if backend == "triton":
        if device_type == "cuda" or (device_type == "cpu" and _triton_interpreted()):
            return ""
        return f"triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device_type}"
    if backend == "cuda":
        return "" if device_type == "cuda" else f"the cuda backend needs CUDA tensors, got {device_type}"
    raise AssertionError(backend)


def is_available(op: str, backend: str, device_type: str) -> bool:
    return not _device_reason(backend, device_type) and _load(op, backend)[0] is not None


def resolve(op: str, device_type: str, backend: str | None = None) -> str:
    """Name of the backend that runs ``op`` on ``device_type``.

    An explicit ``backend`` (or the environment variable) that cannot run the
    call raises ``BackendUnavailableError``; the automatic choice never does.
    """
    if op not in _MODULES:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    requested = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if requested is not None:
        if requested not in BACKENDS:
            source = "backend" if backend is not None else ENV_VAR
            raise ValueError(f"{source}: expected one of {BACKENDS}, got {requested!r}")
        reason = _device_reason(requested, device_type) or _load(op, requested)[1]
        if reason:
            raise BackendUnavailableError(f"backend {requested!r} cannot run {op}: {reason}")
        return requested
    for candidate in BACKENDS:
        if is_available(op, candidate, device_type):
            return candidate
    raise AssertionError("the reference backend is always available")


def get(op: str, backend: str):
    fn, reason = _load(op, backend)
    if fn is None:
        raise BackendUnavailableError(f"backend {backend!r} cannot run {op}: {reason}")
    return fn


def backends(device_type: str = "cuda") -> dict:
    """``{op: [available backends, best first]}`` for tensors on ``device_type``."""
    return {op: [b for b in BACKENDS if is_available(op, b, device_type)] for op in OPS}
