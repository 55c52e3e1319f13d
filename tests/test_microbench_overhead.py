"""``python -m microbench overhead``: structure of its output (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dflash_kernels import _fastpath
from microbench import cli, overhead

ROOT = Path(__file__).resolve().parents[1]

# Until the extension has its probe ops, the subprocess registers stand-ins
# with the schemas of the real CUDA ops (Python no-ops), so that the cuda rows
# run too; the real probes, when registered, are used as they are.
_SCRIPT = r"""
import sys, torch
try:
    import dflash_kernels.cuda  # noqa: F401  (loads the extension)
    have_ext = True
except Exception:
    have_ext = False
if have_ext and not hasattr(torch.ops.dflash, "_probe_write_kv_cuda"):
    lib = torch.library.Library("dflash", "FRAGMENT")
    for op in ("write_kv", "verify_chain"):
        schema = str(getattr(torch.ops.dflash, op + "_cuda").default._schema)
        lib.define(schema.split("::", 1)[1].replace(op + "_cuda(", "_probe_" + op + "_cuda(", 1))
        lib.impl("_probe_" + op + "_cuda", lambda *args: None, "CPU")
print("HAVE_EXT", have_ext)
from microbench.cli import main
sys.exit(main(["overhead", "--rounds", "3", "--inner", "2", "--warmup", "1", "--profile", "2",
               "--json", sys.argv[1]]))
"""


def _expected_cases():
    names = []
    for op, mode in overhead.OP_CASES:
        suffix = f"[{mode}]" if mode else ""
        groups = ["public", "python", "triton", "public+triton"]
        if op in overhead.CUDA_OPS:
            groups += ["cuda", "public+cuda"]
        names += [f"{g}/{op}{suffix}" for g in groups + ["dispatch", "alloc", "resolve"]]
    return names + ["baseline/torch.add", "baseline/custom_op", "baseline/library_op"]


def _check_ok_row(row):
    vals = [row[k] for k in ("median_us", "p10_us", "p90_us", "vs_torch_add")]
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in vals), row
    assert row["p10_us"] <= row["median_us"] <= row["p90_us"], row


def test_overhead_cli_every_case_and_json(tmp_path):
    path = tmp_path / "overhead.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]   # e.g. from kernels' __del__
    out = proc.stdout
    assert "not GPU times" in out and "Public layer breakdown" in out
    have_ext = "HAVE_EXT True" in out
    text = path.read_text()
    doc = json.loads(text)
    assert json.loads(json.dumps(doc)) == doc
    assert doc["schema"] == overhead.SCHEMA and doc["host_times"] is True
    rows = {r["case"]: r for r in doc["rows"]}
    assert sorted(rows) == sorted(_expected_cases())
    for name, row in rows.items():
        assert name in out
        if name.startswith(("cuda/", "public+cuda/")) and not have_ext:
            assert row["status"] == "SKIP" and "probe" in row["note"], row
            continue
        # Triton compiles here through the fake driver: its rows must run.
        assert row["status"] == "OK", row
        assert row["rounds"] == 3
        _check_ok_row(row)
    assert rows["baseline/torch.add"]["vs_torch_add"] == 1.0
    assert len(doc["breakdown"]) == len(overhead.OP_CASES)
    for part in doc["breakdown"]:
        for key in ("public_us", "python_us", "dispatch_us", "alloc_us", "resolve_us",
                    "backend_triton_us", "full_triton_us"):
            assert math.isfinite(part[key]) and part[key] > 0, part
        assert math.isclose(part["validation_derived_us"],
                            part["python_us"] - part["alloc_us"] - part["resolve_us"],
                            rel_tol=1e-9, abs_tol=1e-9)
    assert {k.split("/")[0] for k in doc["profile"]} == {"public", "triton"}
    assert all(doc["profile"][k] for k in doc["profile"])


def test_overhead_in_process_skips_triton_when_interpreted(monkeypatch):
    # Under TRITON_INTERPRET=1 the Triton rows cannot time a launch: SKIP with the reason.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    doc = overhead.run(rounds=2, inner=1, warmup=0)
    rows = {r["case"]: r for r in doc["rows"]}
    assert sorted(rows) == sorted(_expected_cases())
    for name, row in rows.items():
        if name.startswith(("triton/", "public+triton/")):
            assert row["status"] == "SKIP" and "TRITON_INTERPRET" in row["note"], row
            assert row["median_us"] is None
        elif row["status"] == "OK":
            _check_ok_row(row)
    for group in ("public", "python", "dispatch", "alloc", "resolve"):
        assert all(rows[n]["status"] == "OK" for n in rows if n.startswith(group + "/"))


@pytest.mark.skipif(not _fastpath.PLANS, reason="call plans need the extension")
def test_the_python_rows_run_the_python_path_and_the_public_rows_a_plan():
    fn, args, kwargs = overhead._public_call("write_kv", "")
    where = []
    spy = {"write_kv": lambda *a: where.append(sys._getframe(1).f_code.co_name)}
    for plans in (False, True):
        with overhead._registry_handing_out(spy), overhead._call_plans(plans):
            for _ in range(3):
                fn(*args, **kwargs)
    assert where == ["_run"] * 3 + ["_run", "validate", "validate"]


def test_overhead_bad_arguments():
    assert cli.main(["overhead", "--rounds", "0"]) == 2
    assert cli.main(["overhead", "--no-such-option"]) == 2
