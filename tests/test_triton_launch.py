"""triton_backend/_launch.py: a launch it recognises goes to the compiled kernel
Triton itself picked, with the arguments Triton's own path passes.

Runs in a subprocess without TRITON_INTERPRET, under the overhead benchmark's
measurement-only driver (microbench/overhead.py: real sm_90 compiles on the CPU,
launches stubbed), and compares every launcher call of the fast path with
Triton's path, argument by argument.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dflash_kernels import _fastpath

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not _fastpath.ENABLED,
                                reason="dflash_kernels._C is not built (no launch keys)")

_SCRIPT = r"""
import sys, torch
from microbench import overhead as o
reason = o._triton_unavailable_reason()
if reason:
    print("SKIP", reason); sys.exit(0)
with o._fake_triton_driver(True):
    import functools, importlib
    from dflash_kernels import _registry
    from dflash_kernels.triton_backend import _launch
    from triton.tools.tensor_descriptor import TensorDescriptor

    def plain(fn, grid, *args, **kwargs):
        return fn[grid](*args, **kwargs)

    record = []

    def recorder(compiled):
        run = compiled.run            # the launcher (CompiledKernel.run is a property of _run)
        def rec(*a):
            record.append((id(compiled), a))
            return run(*a)
        return rec

    def same(a, b):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            # the caller's tensors themselves; a workspace made per call alike
            return a is b or (type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
                              and a.stride() == b.stride() and a.device == b.device)
        if isinstance(a, tuple) and isinstance(b, tuple):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, TensorDescriptor) or isinstance(b, TensorDescriptor):
            return type(a) is type(b) and same(a.base, b.base) and all(
                list(getattr(a, f)) == list(getattr(b, f)) for f in ("shape", "strides", "block_shape")
            ) and (a.padding, a.round_f32_to_tf32) == (b.padding, b.round_f32_to_tf32)
        return type(a) is type(b) and a == b

    def page64(bargs):
        # block_attention on a page-64 cache: the TMA box path on sm_90 (descriptor arguments)
        q, kc = bargs[0], bargs[1]
        B, P = q.shape[0], 8
        caches = [torch.randn(B * P, 64, kc.shape[2], kc.shape[3], dtype=kc.dtype) for _ in "kv"]
        table = torch.arange(B * P, dtype=torch.int32).view(B, P)
        lens = torch.full((B,), 64 * P - 7, dtype=torch.int32)
        return (q, caches[0], caches[1], table, lens) + tuple(bargs[5:])

    for op, mode, launches in (("write_kv", "", 1), ("fuse_target_features", "", 2),
                               ("inject_kv", "", 1), ("block_attention", "", 1),
                               ("block_attention", "page64", 1),
                               ("verify_chain", "greedy", 1), ("verify_chain", "sampled", 1)):
        fn, args, kw = o._public_call(op, "" if mode == "page64" else mode)
        bargs = o._captured_backend_args(fn, args, kw, op)
        if mode == "page64":
            bargs = page64(bargs)
        tri = _registry._load(op, "triton")[0]
        mod = importlib.import_module(tri.__module__)
        if mode == "page64":      # CPU tensors take the CPU plan, whose default is no TMA
            tri = functools.partial(tri, tma=True)
        before = len(_launch._CACHE)
        tri(*bargs)                                   # compiles; remembered
        assert len(_launch._CACHE) == before + launches, (op, mode, len(_launch._CACHE))
        for compiled, _ in list(_launch._CACHE.values()):
            if not getattr(compiled.run, "_recording", False):
                compiled._run = recorder(compiled)
                compiled._run._recording = True
        mod.launch = plain
        record.clear(); tri(*bargs); slow = list(record)
        mod.launch = _launch.launch
        record.clear(); tri(*bargs); fast = list(record)
        assert len(slow) == len(fast) == launches, (op, len(slow), len(fast))
        for (ks, a), (kf, b) in zip(slow, fast):
            assert ks == kf, op                       # the kernel Triton picked
            # grid, stream, function, packed metadata, then (after the launch
            # metadata and the hooks) every kernel argument
            assert len(a) == len(b) and all(same(x, y) for i, (x, y) in enumerate(zip(a, b))
                                             if i != 6), op
        if mode == "page64":                          # the TMA box: descriptor arguments
            assert any(isinstance(x, TensorDescriptor) for x in fast[0][1]), op
        print("SAME", op, mode, len(fast))

    # Another alignment is another key: Triton's path runs and compiles its own kernel.
    fn, args, kw = o._public_call("write_kv", "")
    bargs = list(o._captured_backend_args(fn, args, kw, "write_kv"))
    k = bargs[0]
    buf = torch.empty(k.numel() + 1, dtype=k.dtype)
    bargs[0] = buf[1:].view(k.shape)                  # 2 bytes off 16-byte alignment
    tri = _registry._load("write_kv", "triton")[0]
    old = {id(c) for c, _ in _launch._CACHE.values()}
    tri(*bargs)
    new = [c for c, _ in _launch._CACHE.values() if id(c) not in old]
    assert len(new) == 1, len(new)                    # a kernel of its own, not a reused one
    print("NEWKEY")
"""


def test_fast_launch_passes_what_triton_passes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    lines = proc.stdout.split()
    assert "NEWKEY" in lines
    assert proc.stdout.count("SAME") == 7, proc.stdout
