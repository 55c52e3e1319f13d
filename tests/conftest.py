"""Test set-up shared by every test module.

Without a GPU, Triton kernels run under the interpreter on CPU tensors; the
interpreter must be switched on before any kernel module is imported, so it is
set here, at collection time. The interpreter's bf16 arithmetic and fp32 to
fp8 rounding are patched (see _interpreter_patches.py) so bf16 and fp8 kernels
can be tested on CPU too. The host fast path double-checks every call it
lets through (DFLASH_KERNELS_FASTPATH_VERIFY).
"""

import os

# Every call the host fast path lets through also runs the Python checks here, and
# a ValueError from them fails the test (dflash_kernels/_fastpath.py, VERIFY).
os.environ.setdefault("DFLASH_KERNELS_FASTPATH_VERIFY", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # pytest-xdist runs one worker per core: intra-op threads on top of that
    # oversubscribe the 2-core CI machine (seen: 20x slower small matmuls).
    torch.set_num_threads(1)

import pytest  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    import _interpreter_patches  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)

    _interpreter_patches.apply()

# Every backend module is imported now, under the interpreter: a test that sets
# TRITON_INTERPRET=0 for a while (tests/test_registry.py) must not be the first to
# import a kernel module, or its kernels would be compiled ones for the rest of
# the session ("0 active drivers" in whichever test launches one next).
from dflash_kernels import _registry  # noqa: E402

for _op in _registry.OPS:
    for _backend in _registry.BACKENDS:
        _registry._load(_op, _backend)

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
