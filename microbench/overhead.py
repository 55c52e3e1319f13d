"""``python -m microbench overhead``: host time per call of every public op, device work removed.

These are CPU host times (``time.perf_counter_ns``), not GPU times: what one
call costs the Python/C++ host path before (and instead of) any kernel runs.
Outside CUDA graphs a decode step of a small drafter is bound by this time.

Cases, all timed in one run, interleaved round by round (every round times
``--inner`` calls of each case one by one and keeps their median; the case
order rotates each round, so that drift from the other processes on the
machine hits all cases alike). A case's figures are the median, p10 and p90
of its rounds:

- ``public``: the public function with a no-op backend: ``_registry.get``
  hands out a function that does nothing (:func:`_registry_handing_out`,
  measurement only). The same call repeats, so after its first call the
  layout's call plan runs it in the extension (docs/DESIGN.md, "Call plans").
- ``python``: the same with call plans off (:func:`_call_plans`): the public
  function's Python every call (validation or its fast skip, normalisation,
  output allocation, backend resolution).
- ``triton``: the Triton backend function alone, on CPU tensors, NOT
  interpreted, with the launch stubbed. Triton's JIT needs a driver: a fake
  one (:class:`_FakeCudaDriver`) reports ``GPUTarget("cuda", 90, 32)``, so each
  kernel compiles once to a real sm_90 cubin on the CPU (ptxas is bundled with
  Triton) and the JIT's whole launch path runs (argument binding and
  specialisation, the kernel-cache lookup, grid, Triton's Python launcher);
  only the C launcher (argument packing and ``cuLaunchKernelEx``) is a no-op.
  CPU tensors make the backend take its CPU branch: the config table's CPU
  row and no ``torch.cuda.device`` context (on a GPU that context costs
  extra), so the row is a lower bound of the GPU launch path.
- ``public+triton``: the two above together (the registry hands out the
  stubbed Triton function): the full stack through Triton.
- ``cuda``: the compiled extension's binding with the kernel launch skipped,
  through ``torch.ops.dflash._probe_<op>_cuda`` (same schema as
  ``<op>_cuda``; CPU tensors), for the ops the extension implements.
  ``public+cuda``: the full stack through the extension (the registry hands
  out ``dflash_kernels.cuda.<op>``, whose ``torch.ops.dflash.<op>_cuda``
  points at the probe during the run). SKIP rows where the probes are absent.
- ``alloc``, ``resolve``: pieces of the public layer, timed on their own: the
  outputs the public function allocates, made as it makes them
  (``_fastpath.empty``: one extension call per dtype, or ``torch.empty``
  each without the extension), and
  ``_registry.resolve``. The breakdown's ``validation (derived)`` is
  ``python - alloc - resolve``.
- ``dispatch``: the ``torch.ops.dflash.<op>`` OpOverload call with the no-op
  backend: what a traced (torch.compile) or profiled call adds; eager calls
  skip it (ops._run).
- ``baseline``: one eager ``torch.add`` of two 1-element tensors (every ratio
  is to it), a no-op ``torch.library.custom_op`` that mutates one tensor, and
  a no-op op made with ``torch.library.Library(...).define`` + ``impl``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import gc
import json
import math
import os
import platform
import pstats
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from .report import _num

SCHEMA = "dflash-microbench-overhead/1"
DESCRIPTION = ("Host time per call of every public op with the device work removed (no-op backend; "
               "Triton launch path with the launch stubbed; CUDA extension path with the kernel "
               "skipped), next to one eager torch.add and bare custom ops. CPU host times, not GPU "
               "times. See docs/benchmark.md, Host overhead.")
BANNER = ("NOTE: these are CPU host times per call (time.perf_counter_ns medians over interleaved "
          "rounds),\n      the host path with the device work removed. They are not GPU times.")

# A decode step of a small drafter (qwen3-8b preset heads, 5 draft layers, 5
# captured layers, block 16, batch 4, 512 cached tokens per request). Host time
# does not depend on the sizes (nothing reads the data), only on the number of
# arguments and of per-layer caches.
DECODE = dict(B=4, S=16, Hq=32, Hkv=8, D=128, H=4096, L=5, K=5, V=151936, page=16, ctx=512)

# (op, mode) of every op case; the extension implements write_kv and verify_chain.
OP_CASES = (("block_attention", ""), ("fuse_target_features", ""), ("inject_kv", ""),
            ("write_kv", ""), ("verify_chain", "greedy"), ("verify_chain", "sampled"))
CUDA_OPS = ("write_kv", "verify_chain")


# --------------------------------------------------------------------------
# Inputs: the public call of each op at the decode shape.
# --------------------------------------------------------------------------

def _public_call(op: str, mode: str):
    """``(public function, args, kwargs)`` of one decode-step call on CPU tensors.

    Tensors come from ``torch.empty`` (nothing reads them; large ones stay
    untouched virtual memory) except index tensors, which are zero.
    """
    import torch

    import dflash_kernels as dk

    d = DECODE
    B, S, Hq, Hkv, D, H, L, K, V = (d[k] for k in ("B", "S", "Hq", "Hkv", "D", "H", "L", "K", "V"))
    act = torch.bfloat16
    pages_per_req = d["ctx"] // d["page"] + 1
    P = B * pages_per_req
    N = B * S

    def cache(*lead):
        return torch.empty(*lead, P, d["page"], Hkv, D, dtype=act)

    def i32(*shape):
        return torch.zeros(shape, dtype=torch.int32)

    def i64(*shape):
        return torch.zeros(shape, dtype=torch.int64)

    if op == "block_attention":
        return dk.block_attention, (
            torch.empty(B, S, Hq, D, dtype=act), cache(), cache(), i32(B, pages_per_req), i32(B),
            torch.empty(B, S, Hkv, D, dtype=act), torch.empty(B, S, Hkv, D, dtype=act)), {}
    if op == "fuse_target_features":
        return dk.fuse_target_features, (
            [torch.empty(N, H, dtype=act) for _ in range(K)], torch.empty(H, K * H, dtype=act),
            torch.empty(H, dtype=act)), {}
    rope = torch.empty(d["ctx"] + S, D, dtype=torch.float32)
    if op == "inject_kv":
        return dk.inject_kv, (
            torch.empty(N, H, dtype=act), torch.empty(L, 2, Hkv * D, H, dtype=act),
            torch.empty(L, D, dtype=act), i64(N), i64(N), cache(L), cache(L), rope), {}
    if op == "write_kv":
        return dk.write_kv, (
            torch.empty(N, L, Hkv, D, dtype=act), torch.empty(N, L, Hkv, D, dtype=act),
            torch.empty(L, D, dtype=act), i64(N), i64(N), cache(L), cache(L), rope), {}
    if op == "verify_chain":
        kwargs = dict(seq_lens=i32(B))
        if mode == "sampled":
            kwargs.update(temperature=torch.ones(B), seeds=i64(B), positions=i64(B))
        return dk.verify_chain, (torch.empty(B, S, V), i64(B, S)), kwargs
    raise AssertionError(op)


# --------------------------------------------------------------------------
# Measurement-only hooks. Nothing here is used outside this benchmark.
# --------------------------------------------------------------------------

def _noop(*args):
    return None


@contextlib.contextmanager
def _registry_handing_out(table: Dict[str, Callable]):
    """MEASUREMENT ONLY: while active, ``dflash_kernels._registry.get`` hands
    out ``table[op]`` whatever the backend name, so the public layer runs with
    the backend function the case wants (a no-op, the stubbed Triton path, the
    probe path). ``_load`` and ``resolve`` are left alone: backend resolution
    is timed as part of the public layer, as it runs."""
    from dflash_kernels import _fastpath, _registry

    saved = _registry.get
    _registry.get = lambda op, backend: table[op]
    _fastpath.forget(plans_only=True)     # plans hold the backend function they recorded
    try:
        yield
    finally:
        _registry.get = saved
        _fastpath.forget(plans_only=True)


@contextlib.contextmanager
def _call_plans(on: bool):
    """MEASUREMENT ONLY: call plans on or off (``_fastpath.PLANS``) for a case."""
    from dflash_kernels import _fastpath

    saved = _fastpath.PLANS
    _fastpath.PLANS = saved and on
    try:
        yield
    finally:
        _fastpath.PLANS = saved


def _fake_cuda_driver():
    """A Triton driver for a machine without a GPU (measurement only).

    It reports an sm_90 target, so the JIT compiles real cubins on the CPU,
    "loads" them without a device, and launches through Triton's own Python
    ``CudaLauncher.__call__`` with the C ``launch`` replaced by a no-op.
    """
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.backends.nvidia.driver import CudaLauncher, ty_to_cpp

    class _Utils:
        launches = 0

        @staticmethod
        def load_binary(name, kernel, shared, device):
            return 1, 1, 0, 0, 1024      # module, function, n_regs, n_spills, max threads

        @staticmethod
        def unload_module(module):
            pass

        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                    "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                    "mem_bus_width": 5120}

    class _StubLauncher(CudaLauncher):
        # CudaLauncher.__init__ builds C argument descriptors with the real
        # driver module (libcuda); set the fields __call__ reads instead.
        def __init__(self, src, metadata):
            self.gsan_enabled = False
            self.arg_annotations = self.kernel_signature = None
            self.num_ctas = getattr(metadata, "num_ctas", 1)
            self.launch = self._no_launch
            self.global_scratch_size = metadata.global_scratch_size
            self.global_scratch_align = metadata.global_scratch_align
            self.profile_scratch_size = metadata.profile_scratch_size
            self.profile_scratch_align = metadata.profile_scratch_align
            self.launch_cooperative_grid = metadata.launch_cooperative_grid
            self.launch_pdl = metadata.launch_pdl

        @staticmethod
        def _no_launch(*args):
            _Utils.launches += 1

    class _FakeCudaDriver(DriverBase):
        def __init__(self):
            self.utils = _Utils()
            self.launcher_cls = _StubLauncher

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            return ty_to_cpp(ty)

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device):
            return 0

        def get_device_capability(self, device):
            return (9, 0)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def get_benchmarker(self):
            raise NotImplementedError("measurement-only driver")

    return _FakeCudaDriver()


def _triton_unavailable_reason() -> str:
    """Empty when the Triton backend can be JIT-compiled in this process, else why not."""
    try:
        from triton.runtime.jit import JITFunction
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return ("TRITON_INTERPRET is set in this process: unset it to time the compiled launch "
                "path (interpreted kernels are not launched)")
    from dflash_kernels import _registry

    fn, _, reason = _registry._load("verify_chain", "triton")
    if fn is None:
        return reason
    kernels = [v for v in vars(sys.modules[fn.__module__]).values() if isinstance(v, JITFunction)]
    if not kernels:
        return ("the Triton backend was imported under TRITON_INTERPRET=1 (its kernels are "
                "interpreter objects)")
    return ""


@contextlib.contextmanager
def _fake_triton_driver(active: bool):
    """MEASUREMENT ONLY: Triton's active driver is the fake one while active.
    Afterwards the real driver is back and the backend kernels forget what
    they compiled against the fake one (a later real launch recompiles)."""
    if not active:
        yield
        return
    import triton
    from triton.runtime.jit import JITFunction

    from dflash_kernels.triton_backend import _launch

    config = triton.runtime.driver
    saved = config._active     # None until first used: then the default is made lazily again
    config.set_active(_fake_cuda_driver())
    _launch.forget()
    try:
        yield
    finally:
        _launch.forget()       # its compiled kernels came from the fake driver
        for name, mod in list(sys.modules.items()):
            if name.startswith("dflash_kernels.triton_backend") and mod is not None:
                for v in vars(mod).values():
                    if isinstance(v, JITFunction):
                        for kernel_cache, *_ in v.device_caches.values():
                            for kernel in kernel_cache.values():
                                kernel.module = None    # "loaded" by the fake: nothing to unload
                        v.device_caches.clear()
        config.set_active(saved)


# Schema arguments the C++ bindings do not take (the cuda backend's wrapper drops
# them: the registry never sends it calls that use them).
_NOT_IN_BINDING = {"verify_chain": ("cu_rows", "filter_order")}


def _binding_args(op: str, bargs) -> tuple:
    """The backend's arguments (schema order) as the extension's binding takes them."""
    from dflash_kernels._schema import OPS

    drop = _NOT_IN_BINDING.get(op, ())
    return tuple(a for name, a in zip(OPS[op].args, bargs) if name not in drop)


def _probe_ops() -> Dict[str, Callable]:
    """``{op: torch.ops.dflash._probe_<op>_cuda}``, or {} without the probes."""
    import torch

    try:
        import dflash_kernels.cuda  # noqa: F401  (loads the extension)
    except Exception:
        return {}
    from dflash_kernels import _C

    # The direct bindings (csrc/bindings/direct.cpp) where the backend calls them,
    # else the torch.ops probes.
    ns = _C if hasattr(_C, "_probe_verify_chain_cuda") else torch.ops.dflash
    out = {}
    for op in CUDA_OPS:
        try:
            out[op] = getattr(ns, f"_probe_{op}_cuda")
        except (AttributeError, RuntimeError):
            return {}
    return out


@contextlib.contextmanager
def _cuda_ops_pointing_at_probes(probes):
    """MEASUREMENT ONLY: the op that ``dflash_kernels.cuda.<op>`` calls (its
    module's ``_op``, bound to ``torch.ops.dflash.<op>_cuda``) is the probe
    while active, so the backend runs its real host path and the binding
    without the kernel."""
    import importlib

    modules = {op: importlib.import_module(f"dflash_kernels.cuda.{op}") for op in probes}
    saved = {op: m._op for op, m in modules.items()}
    for op, probe in probes.items():
        modules[op]._op = probe
    try:
        yield
    finally:
        for op, packet in saved.items():
            modules[op]._op = packet


_BASELINE_OPS: Dict[str, Callable] = {}


def _baseline_ops():
    """The bare custom ops (defined once per process, in their own namespace)."""
    import torch

    if not _BASELINE_OPS:
        # The schema is spelled out: annotations are strings here (__future__).
        @torch.library.custom_op("dflash_overhead::noop_custom_op", mutates_args=("x",),
                                 schema="(Tensor(a!) x) -> ()")
        def noop_custom_op(x):
            return None

        lib = torch.library.Library("dflash_overhead", "FRAGMENT")
        lib.define("noop_library_op(Tensor(a!) x) -> ()")
        lib.impl("noop_library_op", lambda x: None, "CompositeExplicitAutograd")
        _BASELINE_OPS.update(custom=noop_custom_op, library=torch.ops.dflash_overhead.noop_library_op.default,
                             lib=lib)
    return _BASELINE_OPS


# --------------------------------------------------------------------------
# Cases and timing.
# --------------------------------------------------------------------------

@dataclass
class Case:
    # public, triton, public+triton, cuda, public+cuda, dispatch, alloc, resolve, baseline
    group: str
    op: str
    mode: str
    what: str
    call: Optional[Callable] = None
    table: Optional[Dict[str, Callable]] = None   # what the registry hands out during the call
    skip: str = ""
    plans: bool = True                             # call plans on (dflash_kernels._fastpath)
    samples: List[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.group}/{self.op}" + (f"[{self.mode}]" if self.mode else "")


def _captured_backend_args(fn, args, kwargs, op):
    """The arguments the public layer hands the backend (one call, no-op backend)."""
    got = {}
    with _registry_handing_out({op: lambda *a: got.setdefault("args", a)}):
        fn(*args, **kwargs)
    return got["args"]


def _allocated_outputs(op: str, backend_args, args, kwargs) -> List:
    """(shape, dtype) of each output the public call allocated: the tensors
    the custom op's schema marks as written that the caller did not pass."""
    import torch

    passed = {id(t) for v in list(args) + list(kwargs.values())
              for t in (v if isinstance(v, (list, tuple)) else [v])}
    schema = getattr(torch.ops.dflash, op).default._schema
    out = []
    for a, val in zip(schema.arguments, backend_args):
        written = a.alias_info is not None and a.alias_info.is_write
        if written and isinstance(val, torch.Tensor) and id(val) not in passed:
            out.append((tuple(val.shape), val.dtype))
    return out


def build_cases() -> List[Case]:
    """Every case; those that cannot run here carry the reason in ``skip``.
    Call it under :func:`_fake_triton_driver` (the Triton rows need it)."""
    import torch

    from dflash_kernels import _fastpath, _registry

    cases: List[Case] = []
    triton_reason = _triton_unavailable_reason()
    probes = _probe_ops()
    probe_reason = "" if probes else (
        "torch.ops.dflash._probe_{write_kv,verify_chain}_cuda are not registered (an extension "
        "without the probe ops, or none built)")
    cuda_fns = {op: _registry._load(op, "cuda")[0] for op in CUDA_OPS}

    for op, mode in OP_CASES:
        fn, args, kwargs = _public_call(op, mode)
        bargs = _captured_backend_args(fn, args, kwargs, op)
        backend_name = _registry.resolve(op, "cpu", None)

        def public(fn=fn, args=args, kwargs=kwargs):
            fn(*args, **kwargs)

        cases.append(Case("public", op, mode, "public function, no-op backend", public, {op: _noop}))
        cases.append(Case("python", op, mode, "public function with call plans off (its Python "
                          "path every call), no-op backend", public, {op: _noop}, plans=False))
        tri = None if triton_reason else _registry._load(op, "triton")[0]
        cases.append(Case("triton", op, mode, "Triton backend alone, launch stubbed",
                          (lambda tri=tri, bargs=bargs: tri(*bargs)) if tri else None,
                          skip=triton_reason))
        cases.append(Case("public+triton", op, mode, "public function + Triton backend, launch stubbed",
                          public if tri else None, {op: tri}, skip=triton_reason))
        if op in CUDA_OPS:
            probe = probes.get(op)
            pargs = _binding_args(op, bargs)
            cases.append(Case("cuda", op, mode, "extension binding alone (probe op), kernel skipped",
                              (lambda probe=probe, pargs=pargs: probe(*pargs)) if probe else None,
                              skip=probe_reason))
            cases.append(Case("public+cuda", op, mode,
                              "public function + cuda backend (probe op), kernel skipped",
                              public if probe else None, {op: cuda_fns[op]}, skip=probe_reason))
        packet = getattr(torch.ops.dflash, op).default
        cases.append(Case("dispatch", op, mode, "torch.ops.dflash OpOverload call, no-op backend",
                          lambda packet=packet, bargs=bargs, b=backend_name: packet(*bargs, b),
                          {op: _noop}))
        allocs = _allocated_outputs(op, bargs, args, kwargs)
        kinds = {torch.int32: _fastpath.KIND_INT32, torch.float32: _fastpath.KIND_FLOAT32}
        # As the public op allocates: one _fastpath.empty call per output dtype.
        groups: Dict[torch.dtype, list] = {}
        for shape, dtype in allocs:
            groups.setdefault(dtype, []).append(shape)
        groups = [(torch.empty(0, dtype=dtype), kinds.get(dtype, _fastpath.KIND_LIKE), shapes)
                  for dtype, shapes in groups.items()]

        def alloc(groups=groups):
            for like, kind, shapes in groups:
                _fastpath.empty(like, kind, *shapes)

        cases.append(Case("alloc", op, mode,
                          f"{len(allocs)} outputs, _fastpath.empty (what the public op allocates)",
                          alloc))
        cases.append(Case("resolve", op, mode, "_registry.resolve",
                          lambda op=op: _registry.resolve(op, "cpu", None)))

    a, b = torch.ones(1), torch.ones(1)
    x = torch.zeros(1)
    base = _baseline_ops()
    cases.append(Case("baseline", "torch.add", "", "eager torch.add of two 1-element tensors",
                      lambda: torch.add(a, b)))
    cases.append(Case("baseline", "custom_op", "", "no-op torch.library.custom_op mutating one tensor",
                      lambda: base["custom"](x)))
    cases.append(Case("baseline", "library_op", "", "no-op Library.define + impl op mutating one tensor",
                      lambda: base["library"](x)))
    return cases


def _time_batch(call: Callable, inner: int) -> float:
    """Microseconds of one call: the median of ``inner`` calls timed one by one
    (gc off, as timeit does). Timing each call, not the batch, keeps a batch
    that the scheduler preempted once (2 cores shared with other processes)
    from moving the round's figure; each figure includes one
    ``perf_counter_ns`` pair and the case's closure call (~0.1-0.2 us)."""
    times = [0] * inner
    clock = time.perf_counter_ns
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for i in range(inner):
            t0 = clock()
            call()
            times[i] = clock() - t0
    finally:
        if gc_was:
            gc.enable()
    times.sort()
    return _quantile(times, 0.5) / 1e3


def _quantile(sorted_vals: List[float], q: float) -> float:
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def measure(cases: List[Case], rounds: int, inner: int, warmup: int) -> None:
    """Fill each runnable case's ``samples``: ``rounds`` interleaved batches after ``warmup``."""
    run = [c for c in cases if not c.skip]
    probes = _probe_ops()
    with _cuda_ops_pointing_at_probes(probes):
        for r in range(warmup + rounds):
            shift = r % len(run)
            for case in run[shift:] + run[:shift]:
                with _registry_handing_out(case.table or {}), _call_plans(case.plans):
                    t = _time_batch(case.call, inner)
                if r >= warmup:
                    case.samples.append(t)


def _row(case: Case, ref_us: Optional[float]) -> Dict:
    row = dict(case=case.name, group=case.group, op=case.op, mode=case.mode, what=case.what,
               status="SKIP" if case.skip else "OK", note=case.skip, rounds=len(case.samples),
               median_us=None, p10_us=None, p90_us=None, vs_torch_add=None)
    if case.samples:
        s = sorted(case.samples)
        row.update(median_us=_quantile(s, 0.5), p10_us=_quantile(s, 0.1), p90_us=_quantile(s, 0.9))
        if ref_us:
            row["vs_torch_add"] = row["median_us"] / ref_us
    return row


def breakdown(rows: List[Dict]) -> List[Dict]:
    """Per op case: the public layer (call plans on), and its Python path split
    into dispatch, allocation, resolution and the rest (validation and
    normalisation, derived by subtraction)."""
    by = {(r["group"], r["op"], r["mode"]): r["median_us"] for r in rows}
    out = []
    for op, mode in OP_CASES:
        pub, py, disp, alloc, res = (by.get((g, op, mode)) for g in
                                     ("public", "python", "dispatch", "alloc", "resolve"))
        if None in (pub, py, disp, alloc, res):
            continue
        out.append(dict(op=op, mode=mode, public_us=pub, python_us=py, dispatch_us=disp,
                        alloc_us=alloc, resolve_us=res, validation_derived_us=py - alloc - res,
                        backend_triton_us=by.get(("triton", op, mode)),
                        full_triton_us=by.get(("public+triton", op, mode)),
                        backend_cuda_us=by.get(("cuda", op, mode)),
                        full_cuda_us=by.get(("public+cuda", op, mode))))
    return out


def profile_cases(cases: List[Case], calls: int, top: int = 8,
                  groups=("public", "triton")) -> Dict[str, List[Dict]]:
    """cProfile of ``calls`` calls of each case of ``groups``: the functions
    with the most own time. Profiling inflates Python-heavy code, so read the
    shares, not the absolute numbers."""
    out = {}
    for case in cases:
        if case.group not in groups or case.skip:
            continue
        prof = cProfile.Profile()
        with _registry_handing_out(case.table or {}), _call_plans(case.plans):
            prof.enable()
            for _ in range(calls):
                case.call()
            prof.disable()
        st = pstats.Stats(prof)
        total = sum(v[2] for v in st.stats.values()) or 1.0
        entries = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]
        out[case.name] = [dict(function=pstats.func_std_string(k), calls_per_call=v[1] / calls,
                               own_share=v[2] / total, own_us_per_call=v[2] / calls * 1e6)
                          for k, v in entries]
    return out


# --------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------

def _columns(head, lines, right) -> str:
    widths = [max(len(line[i]) for line in [head] + lines) for i in range(len(head) - 1)]
    out = []
    for line in [head] + lines:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells + [line[-1]]).rstrip())
    return "\n".join(out)


def table(rows: List[Dict]) -> str:
    head = ("case", "status", "median us", "p10 us", "p90 us", "vs add", "what")
    lines = [(r["case"], r["status"], _num(r["median_us"], ".2f"), _num(r["p10_us"], ".2f"),
              _num(r["p90_us"], ".2f"),
              "-" if r["vs_torch_add"] is None else f"{r['vs_torch_add']:.1f}x",
              r["what"] + (f" [{r['note']}]" if r["note"] else "")) for r in rows]
    return _columns(head, lines, right=(2, 3, 4, 5))


def breakdown_table(parts: List[Dict]) -> str:
    head = ("op", "public", "python", "dispatch", "alloc", "resolve", "validation*", "triton",
            "pub+triton", "cuda", "pub+cuda")
    lines = [(p["op"] + (f"[{p['mode']}]" if p["mode"] else ""),
              *(_num(p[k], ".1f") for k in ("public_us", "python_us", "dispatch_us", "alloc_us",
                                            "resolve_us", "validation_derived_us",
                                            "backend_triton_us", "full_triton_us",
                                            "backend_cuda_us")),
              _num(p["full_cuda_us"], ".1f")) for p in parts]
    return _columns(head, lines, right=tuple(range(1, 11)))


def _load_note() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"
    except OSError:
        return f"{os.cpu_count()} CPUs"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m microbench overhead", description=DESCRIPTION)
    p.add_argument("--rounds", type=int, default=200, help="timed rounds per case (default 200)")
    p.add_argument("--inner", type=int, default=20,
                   help="calls per case per round, each timed; the round keeps their median "
                        "(default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    p.add_argument("--profile", type=int, default=0, metavar="CALLS",
                   help="also cProfile CALLS calls of each public and triton case and print the "
                        "functions with the most own time")
    p.add_argument("--json", metavar="PATH", help="write the rows, the breakdown and the metadata as JSON")
    return p


def run(rounds: int = 200, inner: int = 20, warmup: int = 5, profile_calls: int = 0) -> Dict:
    """Measure every case; returns the JSON document (rows, breakdown, metadata)."""
    import torch

    triton_ok = not _triton_unavailable_reason()
    with _fake_triton_driver(triton_ok):
        cases = build_cases()
        started = time.perf_counter()
        measure(cases, rounds, inner, max(warmup, 0))
        elapsed = time.perf_counter() - started
        prof = profile_cases(cases, profile_calls) if profile_calls > 0 else {}
    ref = next(c for c in cases if c.group == "baseline" and c.op == "torch.add")
    ref_us = _quantile(sorted(ref.samples), 0.5)
    rows = [_row(c, ref_us) for c in cases]
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_times": True,
        "host": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "load": _load_note()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": _version("triton")},
        "rounds": rounds, "inner": inner, "warmup": warmup, "seconds": elapsed, "shape": dict(DECODE),
        "torch_add_us": ref_us, "rows": rows, "breakdown": breakdown(rows), "profile": prof,
    }


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark and print it; 0, or 2 for bad arguments or an unwritable --json."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    for name in ("rounds", "inner"):
        if getattr(args, name) < 1:
            parser.print_usage(sys.stderr)
            print(f"{parser.prog}: error: --{name}: expected >= 1", file=sys.stderr)
            return 2
    print(BANNER)
    doc = run(args.rounds, args.inner, args.warmup, args.profile)
    doc["argv"] = list(sys.argv[1:] if argv is None else argv)
    print(f"host: {doc['host']['processor']}, {doc['host']['load']}; torch {doc['versions']['torch']}; "
          f"{args.rounds} rounds x {args.inner} calls per case, interleaved, {doc['seconds']:.1f} s; "
          "shape " + ",".join(f"{k}={v}" for k, v in DECODE.items()))
    print(table(doc["rows"]))
    print("\nPublic layer breakdown (median us per call; validation* = python - alloc - "
          "resolve):")
    print(breakdown_table(doc["breakdown"]))
    for name, entries in doc["profile"].items():
        print(f"\ncProfile {name} (own time share, calls per call):")
        for e in entries:
            print(f"  {100 * e['own_share']:5.1f}%  x{e['calls_per_call']:<5.1f} {e['function']}")
    print(BANNER)
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
        except OSError as exc:
            print(f"error: could not write output: {exc}", file=sys.stderr)
            return 2
    return 0


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:
        return None
