"""Host helpers every Triton op uses: the device's architecture and SM count,
the device a launch runs on, Triton's names of the torch dtypes, and integer
ceil-division / next power of two, and the arrival counters of the
one-launch split kernels."""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

# Triton's type names of the torch dtypes (kernel signatures of the compile checks).
TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
             torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5"}


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host ints. ``triton.cdiv`` is a constexpr function in
    Triton 3.8 and costs about 2.3 us per host call here (0.07 us for this)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` for host ints (0 for n <= 0), without its
    constexpr-function call cost."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def wave_split(programs: int, sms: int, tiles: int, fill: int, partial: int,
               max_splits: int) -> int:
    """The split count ``s`` in ``[1, max_splits]`` that minimises the busiest
    SM's work in tile-times, fewest splits on ties: ``programs * s`` programs
    go round-robin over ``sms`` SMs and share an SM's bandwidth, each streams
    ``cdiv(tiles, s)`` tiles plus ``fill`` (pipeline fill) plus ``partial``
    when split (its partial written and read back). The bandwidth-bound
    kernels' split model (block_attention's context, inject_kv's K)."""
    best, best_cost = 1, None
    for s in range(1, max(1, max_splits) + 1):
        cost = cdiv(programs * s, sms) * (cdiv(tiles, s) + fill + (partial if s > 1 else 0))
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


@functools.lru_cache(maxsize=None)
def arch(device: torch.device) -> Optional[int]:
    """Compute capability as ``10 * major + minor`` (90 for sm_90), None for CPU
    tensors (the interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def arch_family(arch: Optional[int]) -> str:
    """Key of the per-architecture config tables: "interp" (no GPU), "sm90"
    (Hopper), "sm100" (Blackwell datacenter) or "default"."""
    if arch is None:
        return "interp"
    return {9: "sm90", 10: "sm100"}.get(arch // 10, "default")


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> Optional[int]:
    """Streaming multiprocessors of a CUDA device, None for CPU tensors: each op
    picks its own small stand-in there (split counts the tests can exercise)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def on_device(t):
    """Context that makes the GPU of ``t`` (a tensor or a device) the current
    device: Triton launches on the current device, and a multi-GPU process may
    call with tensors on another."""
    dev = t if isinstance(t, torch.device) else t.device
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def compile_spec(kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int,
                 unaligned=()) -> dict:
    """A launch's description for the no-GPU compile checks (tests/triton_compile.py):
    ``signature`` with the constexprs marked (a tuple argument: a tuple of types),
    and ``divisible_by_16``: the int and pointer arguments Triton's launcher marks
    16-divisible for aligned shapes (all but fp32 scalars and the names in
    ``unaligned``; element i of a tuple argument ``t`` is named ``t.i``)."""
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    divisible = []
    for n, s in sig.items():
        elems = [(n, s)] if isinstance(s, str) else [(f"{n}.{i}", e) for i, e in enumerate(s)]
        divisible += [p for p, e in elems if e not in ("constexpr", "fp32") and n not in unaligned]
    return dict(kernel=getattr(kernel, "__name__", None) or kernel.fn.__name__, signature=sig,
                constexprs=constexprs, num_warps=num_warps, num_stages=num_stages,
                divisible_by_16=divisible)


# Arrival counters of the one-launch split kernels (inject_kv's split-K,
# block_attention's split merge): int32, one per output tile, 0 between
# launches (the split that arrives last resets its tile's). One buffer per
# (device, stream), so launches on two streams never share one; launches on
# one stream share it, which is safe because they are stream-ordered and each
# leaves it at 0. Never freed (a captured CUDA graph keeps the address, as
# with _kv_epilogue's pointer tables). Production split launches have fewer
# tiles than resident slots (the ops' num_splits_for), so the first buffer
# (at least MIN_COUNTERS) serves every production call; only forced splits
# grow it.
_COUNTERS: dict = {}
_KEEP: list = []
_UNZEROED: set = set()
MIN_COUNTERS = 4096


def _counters(device, n: int):
    if device.type == "cuda":
        key = (device, torch.cuda.current_stream(device).cuda_stream)
        capturing = torch.cuda.is_current_stream_capturing()
    else:
        key, capturing = (device, 0), False
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        # Made during capture, the zeroing memset is a graph node: it runs at
        # every replay (harmless: the counters are 0 between launches) but not
        # now, so the next eager call zeroes the buffer once.
        buf = torch.zeros(max(n, MIN_COUNTERS), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
        _KEEP.append(buf)
        if capturing:
            _UNZEROED.add(key)
    elif not capturing and key in _UNZEROED:
        buf.zero_()
        _UNZEROED.discard(key)
    return buf
