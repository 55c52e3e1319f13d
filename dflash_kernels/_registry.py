"""The one place that knows which backends exist and picks one.

Each op of the schema table (:mod:`dflash_kernels._schema`) has up to three
implementations: ``cuda`` (the compiled extension), ``triton`` and
``reference``. Backend ``b`` implements op ``x`` when the module
``PACKAGES[b].x`` exists and defines a function ``x`` with the schema's
arguments. A backend module may declare ``UNSUPPORTED_ARGS``: the optional
arguments that must be None for it to run a call (decided on the host from
which arguments are None, never from their values).

The choice, in order of precedence: the ``backend=`` argument of a call, the
environment variable ``DFLASH_KERNELS_BACKEND``, then the best backend that can
run the call on its device (cuda, then triton on CUDA tensors, then reference).
An explicit backend that cannot run the call raises
:class:`BackendUnavailableError`; the automatic choice never does.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Tuple

from ._schema import OPS as _SCHEMAS

BACKENDS = ("cuda", "triton", "reference")

PACKAGES = {
    "cuda": "dflash_kernels.cuda",
    "triton": "dflash_kernels.triton_backend",
    "reference": "dflash_kernels.reference",
}

OPS = tuple(_SCHEMAS)

ENV_VAR = "DFLASH_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """Raised when a backend that was asked for cannot run the call."""


@functools.lru_cache(maxsize=None)
def _load(op: str, backend: str):
    """``(function, unsupported optional args, "")`` or ``(None, (), reason)``."""
    package = PACKAGES[backend]
    module_name = f"{package}.{op}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None, frozenset(), f"the {backend} backend has no implementation of {op}"
        return None, frozenset(), f"{module_name} could not be imported ({type(exc).__name__}: {exc})"
    except Exception as exc:  # ImportError, or a missing compiled extension
        return None, frozenset(), f"{module_name} could not be imported ({type(exc).__name__}: {exc})"
    fn = getattr(module, op, None)
    if fn is None:
        return None, frozenset(), f"{module_name} does not define {op}"
    return fn, frozenset(getattr(module, "UNSUPPORTED_ARGS", ())), ""


_ENV_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _getenv(name: str):
    """``os.environ.get(name)`` in a tenth of its time (it runs on every call of
    every op): CPython's POSIX environ keeps an encoded dict; elsewhere the
    plain lookup."""
    if isinstance(_ENV_BYTES, dict):
        value = _ENV_BYTES.get(name.encode())
        return None if value is None else os.fsdecode(value)
    return os.environ.get(name)


def _triton_interpreted() -> bool:
    if isinstance(_ENV_BYTES, dict):
        value = _ENV_BYTES.get(b"TRITON_INTERPRET")
        return value is not None and value != b"0" and value != b""
    return (os.environ.get("TRITON_INTERPRET") or "0") != "0"


def _device_reason(backend: str, device_type: str, interpreted: bool) -> str:
    """Empty when ``backend`` can run on ``device_type``, else why not."""
    if backend == "reference":
        return ""
    if backend == "triton":
        if device_type == "cuda" or (device_type == "cpu" and interpreted):
            return ""
        return f"triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device_type}"
    if backend == "cuda":
        return "" if device_type == "cuda" else f"the cuda backend needs CUDA tensors, got {device_type}"
    raise AssertionError(backend)


def _reason(op: str, backend: str, device_type: str, given: Tuple[str, ...],
            interpreted: bool) -> str:
    """Empty when ``backend`` can run this call of ``op``, else why not."""
    reason = _device_reason(backend, device_type, interpreted)
    if reason:
        return reason
    fn, unsupported, reason = _load(op, backend)
    if fn is None:
        return reason
    refused = [name for name in given if name in unsupported]
    if refused:
        return f"its {op} does not take {', '.join(refused)}"
    return ""


def is_available(op: str, backend: str, device_type: str, given: Tuple[str, ...] = ()) -> bool:
    """Whether ``backend`` can run ``op`` on ``device_type`` with the optional
    arguments named in ``given`` not None."""
    return not _reason(op, backend, device_type, tuple(given), _triton_interpreted())


def resolve(op: str, device_type: str, backend: str | None = None,
            given: Tuple[str, ...] = ()) -> str:
    """Name of the backend that runs ``op`` on ``device_type``.

    ``given``: the names of the optional arguments of the call that are not
    None (``dflash_kernels._schema.OPS[op].optional``); a backend that cannot
    take one of them is skipped (automatic choice) or refused (explicit).
    """
    from_env = backend is None
    requested = (_getenv(ENV_VAR) or None) if from_env else backend
    return _resolve(op, device_type, requested, from_env, tuple(given), _triton_interpreted())


@functools.lru_cache(maxsize=1024)
def _resolve(op, device_type, requested, from_env, given, interpreted) -> str:
    # Cached: every call of every op resolves (errors are raised, not cached).
    if op not in _SCHEMAS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if requested is not None:
        if requested not in BACKENDS:
            source = ENV_VAR if from_env else "backend"
            raise ValueError(f"{source}: expected one of {BACKENDS}, got {requested!r}")
        reason = _reason(op, requested, device_type, given, interpreted)
        if reason:
            raise BackendUnavailableError(f"backend {requested!r} cannot run {op}: {reason}")
        return requested
    for candidate in BACKENDS:
        if not _reason(op, candidate, device_type, given, interpreted):
            return candidate
    raise AssertionError("the reference backend runs every call")


def resolve_call(op: str, device_type: str, backend: str | None, args: tuple, optional) -> str:
    """:func:`resolve` for a call whose schema arguments are ``args``;
    ``optional``: ``(index, name)`` of its optional arguments. ``given`` is
    computed only when it can change the answer (:func:`given_matters`)."""
    interpreted = _triton_interpreted()
    given = (tuple([name for i, name in optional if args[i] is not None])
             if _given_matters(op, device_type, interpreted) else ())
    from_env = backend is None
    requested = (_getenv(ENV_VAR) or None) if from_env else backend
    return _resolve(op, device_type, requested, from_env, given, interpreted)


def given_matters(op: str, device_type: str) -> bool:
    """Whether ``given`` can change :func:`resolve`'s answer for ``op`` on
    ``device_type``: some backend that can run there refuses an optional
    argument. When not, callers may pass ``given=()`` (ops._run skips
    computing it)."""
    return _given_matters(op, device_type, _triton_interpreted())


@functools.lru_cache(maxsize=None)
def _given_matters(op, device_type, interpreted) -> bool:
    return any(_load(op, b)[1] for b in BACKENDS
               if not _device_reason(b, device_type, interpreted))


def get(op: str, backend: str):
    """The function of ``backend`` implementing ``op``."""
    fn, _, reason = _load(op, backend)
    if fn is None:
        raise BackendUnavailableError(f"backend {backend!r} cannot run {op}: {reason}")
    return fn


def backends(device_type: str = "cuda") -> dict:
    """``{op: [backends that implement it on device_type, best first]}``.

    A backend listed here may still refuse some optional arguments (the CUDA
    ``verify_chain`` takes no ``top_k``, ``top_p`` or ``draft_probs``);
    :func:`resolve` with ``given`` names the one that runs a given call, and
    :func:`unsupported_args` says what each refuses.
    """
    return {op: [b for b in BACKENDS if is_available(op, b, device_type)] for op in OPS}


def unsupported_args(op: str, backend: str) -> frozenset:
    """The optional arguments of ``op`` that ``backend`` cannot take."""
    return _load(op, backend)[1]
