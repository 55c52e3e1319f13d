"""Kernel launches without Triton's per-call argument binding (docs/DESIGN.md,
"Host fast path").

``fn[grid](*args, **kwargs)`` binds every argument, specialises each one,
hashes the specialisation and reads Triton's knobs before its launcher packs
the arguments: about 15-20 us of host time per launch in Triton 3.8
(``python -m microbench overhead``). :func:`launch` keys a launch by what can
change that work's outcome, exactly: the kernel, the current device, Triton's
debug / instrumentation knobs, the keyword names, and the extension's
signature of every argument (``_C.launch_key``: per tensor its dtype, device,
sizes, strides and address modulo 16; every scalar's value; tuples element by
element; a host ``TensorDescriptor`` by its fields). Triton's specialisation reads no more than that (a tensor's dtype and
16-byte alignment, an int's value), so a key seen before names the compiled
kernel Triton itself picked, and the launch goes to it through
``CompiledKernel.run`` as ``JITFunction.run`` ends. Everything else (the first
launch of a key, the interpreter, no extension, a grid that is not a tuple,
pre-run hooks, an argument the extension does not model, a changed global the
kernel reads) takes ``fn[grid](...)``.
"""

from __future__ import annotations

from triton import knobs
from triton.compiler.compiler import CompiledKernel
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

try:
    from .._C import launch_key as _launch_key
except (ImportError, OSError, AttributeError):
    _launch_key = None
else:
    # The TMA paths pass host tensor descriptors: keyed by their fields (base tensor,
    # shape, strides, block shape, padding), a superset of what Triton specialises on
    # (the base's dtype and the block shape).
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .._C import launch_key_types
    launch_key_types(TensorDescriptor)

_MISSING = object()

# key -> (compiled kernel, (name, default) of the parameters after the positional ones)
_CACHE: dict = {}
_MAX_ENTRIES = 4096


def launch(fn, grid, *args, **kwargs):
    """``fn[grid](*args, **kwargs)``; ``grid`` a tuple of 1-3 ints."""
    if (_launch_key is None or knobs.runtime.interpret or not isinstance(fn, JITFunction)
            or fn.pre_run_hooks or knobs.runtime.add_stages_inspection_hook is not None
            or type(grid) is not tuple):
        return fn[grid](*args, **kwargs)
    sig = _launch_key(args + tuple(kwargs.values()))
    if sig is None:
        return fn[grid](*args, **kwargs)
    device = driver.active.get_current_device()
    key = (fn, device, fn.debug, knobs.runtime.debug, knobs.compilation.instrumentation_mode,
           tuple(kwargs), sig)
    hit = _CACHE.get(key)
    if hit is None:
        compiled = fn[grid](*args, **kwargs)
        if isinstance(compiled, CompiledKernel):
            if len(_CACHE) >= _MAX_ENTRIES:
                _CACHE.clear()
            _CACHE[key] = (compiled, tuple((p.name, p.default) for p in fn.params[len(args):]))
        return compiled
    for (name, _), (val, globals_dict) in fn.used_global_vals.items():
        if globals_dict.get(name, _MISSING) != val:
            return fn[grid](*args, **kwargs)    # Triton raises the error
    compiled, tail = hit
    # Every parameter in order, as Triton's binder gives them (constexprs included).
    full = args + tuple([kwargs[n] if n in kwargs else d for n, d in tail])
    stream = driver.active.get_current_stream(device)
    n = len(grid)
    compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream,
                 compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *full),
                 knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *full)
    return compiled


def forget() -> None:
    """Drop every remembered launch (when the active driver changes; tests)."""
    _CACHE.clear()
