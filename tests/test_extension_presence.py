"""The package with and without the compiled extension.

CI builds the extension on every run (nvcc is on its PATH) and sets
DFLASH_KERNELS_REQUIRE_EXTENSION=1, so a build that silently fell back to a
pure-Python install fails here instead of skipping every extension test.
"""

import importlib.util
import os
import subprocess
import sys

import pytest


def test_extension_built_when_required():
    if os.environ.get("DFLASH_KERNELS_REQUIRE_EXTENSION") != "1":
        pytest.skip("DFLASH_KERNELS_REQUIRE_EXTENSION is not set")
    assert importlib.util.find_spec("dflash_kernels._C") is not None, (
        "the compiled extension was required but not built: see the setup's one-line message")
    from dflash_kernels import _C  # noqa: F401  (it must also load)


_WITHOUT_EXTENSION = r"""
import sys
sys.modules["dflash_kernels._C"] = None  # makes `import dflash_kernels._C` raise ImportError
import torch
import dflash_kernels as dk
for op, names in dk.backends("cuda").items():
    assert "cuda" not in names, (op, names)
    assert names[-1] == "reference", (op, names)
try:
    dk.verify_chain(torch.randn(2, 3, 11, device="meta"), torch.zeros(2, 3, dtype=torch.int32, device="meta"),
                    backend="cuda")
except dk.BackendUnavailableError as exc:
    assert "could not be imported" in str(exc) or "CUDA tensors" in str(exc), exc
else:
    raise AssertionError("the cuda backend was reported available without the extension")
logits = torch.full((2, 3, 11), -1.0)
logits[:, :, 4] = 2.0
res = dk.verify_chain(logits, torch.full((2, 3), 4, dtype=torch.int32))
assert res.accept_len.tolist() == [2, 2] and res.bonus.tolist() == [4, 4], res
print("ok")
"""


def test_package_works_without_extension():
    env = dict(os.environ, TRITON_INTERPRET="0", DFLASH_KERNELS_BACKEND="")
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
