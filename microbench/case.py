"""One benchmark case: inputs, the implementations to run, and how to check them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .presets import Shape

ACT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LOGITS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CACHE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# Cache scale of fp8 cases: a power of two, so stored * scale is exact in bf16/fp16.
FP8_SCALE = 1.0 / 64


@dataclass
class Impl:
    """``fn(inputs) -> outputs`` runs the op once on one input set."""

    name: str                 # reference | triton | cuda | torch | flashinfer | flash_attn
    kind: str                 # "ours" or "baseline"
    fn: Callable[[dict], object]
    graph_ok: bool = True     # may be captured in a CUDA graph
    skip: str = ""            # non-empty: not run in this case, and why


@dataclass
class Case:
    suite: str
    op: str
    shape: Shape
    dtype: str
    batch: int
    ctx: int
    make_inputs: Callable[[], dict]
    impls: List[Impl]
    oracle: Optional[Impl]
    compare: Callable[[object, object], Tuple[bool, Optional[float], str]]
    nbytes: int
    mutable: Sequence[str] = ()   # inputs an op writes (reset to their first state before each check)
    outputs: Sequence[str] = ()   # output buffers (filled with garbage before each check)
    extra: Dict[str, object] = field(default_factory=dict)
    mode: str = ""                # a variant of the op (verify_chain: greedy or sampled)


def cache_dtype(shape: Shape, act: torch.dtype) -> torch.dtype:
    return act if shape.cache == "auto" else CACHE_DTYPES[shape.cache]


def clone_inputs(inp: dict) -> dict:
    """A new input set with the same values (same strides); private state is not copied."""
    out = {}
    for key, value in inp.items():
        if key.startswith("_"):
            continue
        if isinstance(value, torch.Tensor):
            c = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
            out[key] = c.copy_(value)
        else:
            out[key] = value
    return out


def input_bytes(inp: dict) -> int:
    seen, total = set(), 0
    for value in inp.values():
        if isinstance(value, torch.Tensor):
            key = value.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += value.untyped_storage().nbytes()
    return total


def fill_garbage(t: torch.Tensor) -> None:
    """NaN for float buffers, -7 for integer ones, so unwritten elements show."""
    if t.dtype.is_floating_point:
        t.fill_(float("nan"))
    else:
        t.fill_(-7)


def as_tuple(x) -> tuple:
    if isinstance(x, torch.Tensor):
        return (x,)
    return tuple(t for t in x if t is not None)


def snapshot(x) -> tuple:
    """A detached copy of an op's outputs (the buffers are reused by the next run)."""
    return tuple(t.detach().clone() for t in as_tuple(x))


def close(tol: Dict[torch.dtype, Tuple[float, float]]):
    """allclose in fp32 with (atol, rtol) chosen by the compared tensors' dtype; NaN never passes."""

    def compare(got, want):
        worst = 0.0
        for g, w in zip(as_tuple(got), as_tuple(want)):
            if g.shape != w.shape:
                return False, None, f"shape {list(g.shape)} != {list(w.shape)}"
            atol, rtol = tol.get(w.dtype, tol.get(None, (1e-2, 1e-2)))
            gf, wf = g.float(), w.float()
            err = (gf - wf).abs()
            bad = ~(err <= atol + rtol * wf.abs())       # NaN in either side counts as bad
            finite = err[torch.isfinite(err)]
            worst = max(worst, float(finite.max()) if finite.numel() else 0.0)
            if bool(bad.any()):
                n = int(bad.sum())
                return False, worst, f"{n} of {g.numel()} elements off (atol {atol}, rtol {rtol})"
        return True, worst, ""

    return compare


def equal(got, want):
    """Exact equality of every output tensor (token ids)."""
    for g, w in zip(as_tuple(got), as_tuple(want)):
        if g.shape != w.shape:
            return False, None, f"shape {list(g.shape)} != {list(w.shape)}"
        if not torch.equal(g.to(torch.int64), w.to(torch.int64)):
            n = int((g.to(torch.int64) != w.to(torch.int64)).sum())
            return False, None, f"{n} of {g.numel()} ids differ"
    return True, 0.0, ""
