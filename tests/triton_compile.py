"""Compile a Triton kernel for a GPU target on a machine without a GPU.

Under ``TRITON_INTERPRET=1`` (set by conftest.py when there is no GPU) a
``@triton.jit`` function is an interpreter object that cannot be compiled, so
the compilation runs in a subprocess with the interpreter switched off.

``compile_report`` returns ``ptx`` (the PTX text), ``shared`` (bytes of
shared memory the launch needs), and from triton's bundled ``cuobjdump
--dump-resource-usage`` on the cubin: ``registers`` per thread, ``stack`` and
``local`` bytes per thread, and ``spills`` (local + stack bytes: zero when
nothing went to local memory).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
args = json.loads(sys.argv[1])
kernel = getattr(importlib.import_module(args["module"]), args["kernel"])
kernel = getattr(kernel, "fn", kernel) if not hasattr(kernel, "src") else kernel
signature = {n: tuple(t) if isinstance(t, list) else t for n, t in args["signature"].items()}
names = list(signature)
def path(n):  # "t.i": element i of tuple argument t
    name, _, i = n.partition(".")
    return (names.index(name),) + ((int(i),) if i else ())
attrs = {path(n): [["tt.divisibility", d]] for n, d in args["divisibility"].items()}
src = ASTSource(fn=kernel, signature=signature, constexprs=args["constexprs"], attrs=attrs)
ck = triton.compile(src, target=GPUTarget("cuda", args["arch"], 32),
                    options={"num_warps": args["num_warps"], "num_stages": args["num_stages"]})
open(args["cubin"], "wb").write(ck.asm["cubin"])
open(args["ptx"], "w").write(ck.asm["ptx"])
print(json.dumps({"shared": ck.metadata.shared}))
"""

RESOURCE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cuobjdump_path() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(binary: str) -> list[dict]:
    """Per-function REG/STACK/SHARED/LOCAL of a cubin or a fat binary (.so)."""
    out = subprocess.run([str(cuobjdump_path()), "--dump-resource-usage", binary],
                         capture_output=True, text=True, check=True).stdout
    rows = []
    for m in RESOURCE_RE.finditer(out):
        reg, stack, shared, local = map(int, m.groups())
        rows.append({"registers": reg, "stack": stack, "shared_static": shared, "local": local})
    return rows


def compile_report(module: str, kernel: str, signature: dict, constexprs: dict, arch: int,
                   num_warps: int = 4, num_stages: int = 2, divisibility: dict | None = None) -> dict:
    """Compile ``module.kernel`` for ``sm_{arch}`` and report its resources.

    ``signature`` maps every argument name to a Triton type string
    (``"*fp16"``, ``"i32"``, ``"fp32"``, ``"constexpr"``), or a tuple argument
    to a tuple of them; ``constexprs`` maps the constexpr names to values.
    ``divisibility`` maps argument names (``"t.i"``: element i of tuple ``t``) to
    the power of two they are divisible by (``{"k_ptr": 16, "stride": 16}``),
    the hints a real launch derives from its arguments: without them Triton
    neither vectorizes nor pipelines, and the report describes other code.
    """
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        args = dict(module=module, kernel=kernel, signature=signature, constexprs=constexprs,
                    divisibility=divisibility or {}, arch=arch, num_warps=num_warps, num_stages=num_stages, cubin=cubin, ptx=ptx)
        env = dict(os.environ, TRITON_INTERPRET="0")
        proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(args)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {module}.{kernel} for sm_{arch} failed:\n{proc.stderr[-4000:]}")
        meta = json.loads(proc.stdout.strip().splitlines()[-1])
        usage = resource_usage(cubin)
        if len(usage) != 1:
            raise RuntimeError(f"expected one function in the cubin, got {usage}")
        report = dict(usage[0], shared=meta["shared"], ptx=Path(ptx).read_text())
    report["spills"] = report["local"] + report["stack"]
    return report
