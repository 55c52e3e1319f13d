"""Run one case: check every implementation against the oracle, then time it."""

from __future__ import annotations

import traceback
from typing import Callable, Dict, List, Optional

import torch

from . import roofline, timing
from .case import Case, Impl, clone_inputs, fill_garbage, input_bytes, snapshot

ROW_KEYS = (
    "suite", "op", "mode", "preset", "shape", "dtype", "batch", "ctx", "impl", "kind", "status", "error",
    "check", "max_abs_err", "time_ms", "min_ms", "max_ms", "runs", "timing", "copies", "bytes",
    "gbps", "frac_copy_bw", "speedup_vs_torch", "extra", "command",
)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case, device: torch.device, *, copy_gbps: Optional[float],
             select: Optional[List[str]] = None, rotate_bytes: Optional[int] = None, reps: int = 50,
             max_seconds: float = 1.0, graph: bool = True,
             command_for: Callable[[Impl], str] = lambda impl: "", verbose: bool = False) -> List[Dict]:
    """One row per implementation of ``case`` (those named in ``select``, or all).

    Each implementation first runs once on the first input set, with its
    output buffers filled with garbage and the caches it writes reset; the
    result is compared with the oracle's (the reference backend, else the
    PyTorch composition). A wrong result is a FAIL row and is not timed; an
    exception is an ERROR row. Nothing here raises.
    """
    impls = [i for i in case.impls if select is None or i.name in select]
    base = {
        "suite": case.suite, "op": case.op, "mode": case.mode, "preset": case.shape.name, "shape": case.shape.as_dict(),
        "dtype": case.dtype, "batch": case.batch, "ctx": case.ctx, "bytes": case.nbytes,
        "extra": dict(case.extra),
    }
    rows = []

    def row(impl, **fields):
        r = dict.fromkeys(ROW_KEYS)
        r.update(base)
        r.update(impl=impl.name, kind=impl.kind, command=command_for(impl))
        r.update(fields)
        rows.append(r)
        return r

    try:
        inp0 = case.make_inputs()
        _sync(device)
    except Exception as exc:  # e.g. out of memory for this shape
        for impl in impls:
            row(impl, status="ERROR", error=f"building inputs: {_short(exc)}")
        return rows
    pristine = {k: inp0[k].clone() for k in case.mutable}

    def run_once(impl):
        for k in case.mutable:
            inp0[k].copy_(pristine[k])
        for k in case.outputs:
            fill_garbage(inp0[k])
        out = snapshot(impl.fn(inp0))
        _sync(device)
        return out

    want, oracle_note = None, "unchecked: no oracle for this case"
    if case.oracle is not None:
        try:
            want = run_once(case.oracle)
            oracle_note = ""
        except Exception as exc:
            oracle_note = f"unchecked: oracle {case.oracle.name} failed ({_short(exc)})"
            if verbose:
                traceback.print_exc()

    sets = None
    for impl in impls:
        if impl.skip:
            row(impl, status="SKIP", error=impl.skip)
            continue
        try:
            got = run_once(impl)
        except Exception as exc:
            if verbose:
                traceback.print_exc()
            row(impl, status="ERROR", error=_short(exc))
            continue
        if impl is case.oracle and want is not None:
            ok, err, check = True, 0.0, "oracle"
        elif want is None:
            ok, err, check = True, None, oracle_note
        else:
            try:
                ok, err, msg = case.compare(got, want)
            except Exception as exc:
                ok, err, msg = False, None, f"compare raised {_short(exc)}"
            check = f"vs {case.oracle.name}" + ("" if ok else f": {msg}")
        if not ok:
            row(impl, status="FAIL", check=check, max_abs_err=err)
            continue
        if sets is None:
            try:
                n = timing.copies_for(input_bytes(inp0), device, rotate_bytes)
                sets = [inp0] + [clone_inputs(inp0) for _ in range(n - 1)]
            except Exception as exc:
                sets = [inp0]
                check += f" (one input set: {_short(exc)})"
        try:
            t = timing.time_call(lambda i: impl.fn(sets[i % len(sets)]), len(sets), device,
                                 reps=reps, max_seconds=max_seconds, graph=graph and impl.graph_ok,
                                 warmup=1 if device.type == "cpu" else 5)
        except Exception as exc:
            if verbose:
                traceback.print_exc()
            row(impl, status="ERROR", error=f"timing: {_short(exc)}", check=check, max_abs_err=err)
            continue
        achieved = roofline.gbps(case.nbytes, t.median_s)
        row(impl, status="OK", check=check, max_abs_err=err, time_ms=t.median_s * 1e3,
            min_ms=t.min_s * 1e3, max_ms=t.max_s * 1e3, runs=t.runs,
            timing=t.method + (f" ({t.note})" if t.note else ""), copies=len(sets), gbps=achieved,
            frac_copy_bw=roofline.fraction(achieved, copy_gbps))

    torch_rows = [r for r in rows if r["impl"] == "torch" and r["time_ms"]]
    if torch_rows:
        base_ms = torch_rows[0]["time_ms"]
        for r in rows:
            if r["time_ms"]:
                r["speedup_vs_torch"] = roofline.speedup(base_ms, r["time_ms"])
    del sets, inp0, pristine, want
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows
