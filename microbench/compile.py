"""Compile Triton kernels for a GPU target on a machine without a GPU.

Under ``TRITON_INTERPRET=1`` (the tests set it when there is no GPU) a
``@triton.jit`` function is an interpreter object that cannot be compiled, so
compilation runs in a subprocess with the interpreter switched off; one
subprocess compiles a whole batch of jobs (importing torch and Triton costs
seconds), and ``jobs`` subprocesses run side by side.

A compiled job is cached on disk (``cache_dir``, default
``$DFLASH_COMPILE_CACHE`` or ``~/.cache/dflash_kernels/compile``) under a key
made of the job, the target and a hash of every source file of
``dflash_kernels/triton_backend`` and Triton's version: editing a kernel
recompiles it, rerunning the report or the tests does not.

``compile_report`` (the old ``tests/triton_compile.py`` interface) returns
``ptx``, ``shared`` (bytes of dynamic shared memory the launch needs) and, from
triton's bundled ``cuobjdump --dump-resource-usage``: ``registers`` per thread,
``stack`` and ``local`` bytes per thread and ``spills`` (local + stack).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

_SCRIPT = r"""
import importlib, json, sys, traceback
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
for job in json.load(open(sys.argv[1])):
    try:
        kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
        # A tuple argument's types arrive as a JSON list; "t.i" names its element i.
        signature = {n: tuple(t) if isinstance(t, list) else t for n, t in job["signature"].items()}
        # attrs are keyed by the kernel's own argument positions (ASTSource matches the
        # signature by name): a job that lists its arguments in another order keeps its hints.
        names = list(kernel.arg_names)
        def path(n):
            name, _, i = n.partition(".")
            return (names.index(name),) + ((int(i),) if i else ())
        attrs = {path(n): [["tt.divisibility", d]] for n, d in job["divisibility"].items()}
        src = ASTSource(fn=kernel, signature=signature, constexprs=job["constexprs"], attrs=attrs)
        opts = dict(job["options"], num_warps=job["num_warps"], num_stages=job["num_stages"])
        ck = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=opts)
        open(job["out"] + ".cubin", "wb").write(ck.asm["cubin"])
        open(job["out"] + ".ptx", "w").write(ck.asm["ptx"])
        meta = {"shared": ck.metadata.shared, "name": ck.metadata.name}
        open(job["out"] + ".json", "w").write(json.dumps(meta))
    except Exception:
        open(job["out"] + ".err", "w").write(traceback.format_exc())
"""

RESOURCE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_BACKEND_DIR = Path(__file__).resolve().parent.parent / "dflash_kernels" / "triton_backend"


@dataclass(frozen=True)
class TritonJob:
    """One kernel at one configuration: what ``triton.compile`` needs besides the target.

    ``signature`` maps every argument name to a Triton type (``"*bf16"``,
    ``"i32"``, ``"fp32"``, ``"constexpr"``); ``constexprs`` the constexpr
    values; ``divisibility`` argument names to the power of two they are
    divisible by, the hints a real launch derives from its arguments (without
    them Triton neither vectorizes nor pipelines, and the SASS is of other code).
    """

    module: str
    kernel: str
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int = 4
    num_stages: int = 2
    divisibility: Dict[str, int] = field(default_factory=dict)
    options: Dict[str, object] = field(default_factory=dict)   # e.g. enable_fp_fusion


def tool_path(name: str) -> Path:
    """A tool bundled with Triton's NVIDIA backend (cuobjdump, nvdisasm, ptxas)."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def cuobjdump_path() -> Path:
    return tool_path("cuobjdump")


def cuobjdump(*args: str) -> str:
    return subprocess.run([str(cuobjdump_path()), *args], capture_output=True, text=True,
                          check=True).stdout


def sass_text(cubin: str) -> str:
    """``cuobjdump -sass`` of a cubin, kept next to it (disassembly takes ~1 s a kernel)."""
    cached = Path(cubin).with_suffix(".sass")
    if cached.exists() and cached.stat().st_mtime >= Path(cubin).stat().st_mtime:
        return cached.read_text()
    text = cuobjdump("-sass", cubin)
    cached.write_text(text)
    return text


def resource_usage(binary: str) -> List[dict]:
    """Per-function REG/STACK/SHARED/LOCAL of a cubin or a fat binary (.so), in file order."""
    out = cuobjdump("--dump-resource-usage", binary)
    rows = []
    for fn, m in zip(re.findall(r"Function (\S+):", out), RESOURCE_RE.finditer(out)):
        reg, stack, shared, local = map(int, m.groups())
        rows.append({"function": fn, "registers": reg, "stack": stack, "shared_static": shared,
                     "local": local, "spills": stack + local})
    return rows


def _source_hash() -> str:
    import triton

    h = hashlib.sha256(triton.__version__.encode())
    for p in sorted(_BACKEND_DIR.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(_SCRIPT.encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    env = os.environ.get("DFLASH_COMPILE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dflash_kernels" / "compile"


def _key(job: TritonJob, arch: int, src_hash: str) -> str:
    text = json.dumps([asdict(job), arch, src_hash], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _run_batch(batch: List[dict]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(batch, f)
    try:
        env = dict(os.environ, TRITON_INTERPRET="0")
        proc = subprocess.run([sys.executable, "-c", _SCRIPT, f.name], capture_output=True,
                              text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"the compile subprocess failed:\n{proc.stderr[-4000:]}")
    finally:
        os.unlink(f.name)


def compile_many(work: Sequence[tuple], cache_dir: Optional[Path] = None, jobs: int = 2) -> List[dict]:
    """Compile every ``(TritonJob, arch)`` of ``work`` (cached); one dict per item, in order.

    Each dict has ``cubin`` (path), ``ptx`` (text), ``shared`` (dynamic shared
    bytes), ``name`` (the cubin's function name) and the resource usage
    (``registers``, ``stack``, ``local``, ``spills``, ``shared_static``).
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    src_hash = _source_hash()
    outs, todo = [], []
    for job, arch in work:
        out = str(cache / _key(job, arch, src_hash))
        outs.append(out)
        if not os.path.exists(out + ".json") and out not in {t["out"] for t in todo}:
            todo.append(dict(asdict(job), arch=int(arch), out=out))
    if todo:
        n = max(1, min(jobs, len(todo)))
        batches = [todo[i::n] for i in range(n)]
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(_run_batch, batches))
    results = []
    for (job, arch), out in zip(work, outs):
        if os.path.exists(out + ".err"):
            err = Path(out + ".err").read_text()
            os.unlink(out + ".err")          # not cached: the next run tries again
            raise RuntimeError(f"compiling {job.module}.{job.kernel} for sm_{arch} failed:\n"
                               f"{err[-4000:]}")
        meta = json.loads(Path(out + ".json").read_text())
        usage = resource_usage(out + ".cubin")
        if len(usage) != 1:
            raise RuntimeError(f"expected one function in the cubin, got {usage}")
        results.append(dict(usage[0], shared=meta["shared"], name=meta["name"],
                            cubin=out + ".cubin", ptx=Path(out + ".ptx").read_text()))
    return results


def compile_report(module: str, kernel: str, signature: dict, constexprs: dict, arch: int,
                   num_warps: int = 4, num_stages: int = 2, divisibility: dict | None = None,
                   options: dict | None = None) -> dict:
    """Compile ``module.kernel`` for ``sm_{arch}`` and report its resources (see the module doc)."""
    job = TritonJob(module, kernel, dict(signature), dict(constexprs), num_warps, num_stages,
                    dict(divisibility or {}), dict(options or {}))
    return compile_many([(job, arch)], jobs=1)[0]
