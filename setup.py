"""Build script: adds the compiled extension ``dflash_kernels._C`` (csrc/) when a
CUDA toolkit (nvcc) and a CUDA build of PyTorch are present; otherwise a
pure-Python install (Triton and reference backends). Packaging metadata lives
in pyproject.toml.

Environment:
  DFLASH_KERNELS_NO_EXTENSION=1  skip the extension.
  TORCH_CUDA_ARCH_LIST           e.g. "9.0a;10.0a" (default: the visible GPU's
                                 arch, or "9.0a;10.0a" without a GPU).
  MAX_JOBS                       parallel compile jobs (ninja); NVCC_THREADS
                                 nvcc's own --threads (default 2).
  CUDA_HOME                      the toolkit (default: found from nvcc).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "9.0a;10.0a"
# 64-bit shared-memory pointers, as NVRTC compiles them: nvcc's front end (cicc)
# makes them 32-bit by default, NVRTC's has no option for that, and the width
# changes the address arithmetic ptxas gets (write_kv_kernel with 32-bit
# pointers: 48 registers on sm_90a for 16-bit caches and 40 on sm_100a; with
# 64-bit ones 45 and 48). With this flag the extension's kernels have the
# no-build path's registers and SASS (docs/cuda.md, "No-build path (NVRTC)").
SHARED_PTR_FLAG = "-Xcicc=--sharedmem32=0"


def _say(msg):
    print(f"dflash_kernels setup: {msg}", file=sys.stderr)


def _find_cuda_home():
    """The toolkit root: CUDA_HOME / CUDA_PATH, else the directory above nvcc
    (through wrapper scripts, by looking for include/cuda_runtime.h)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for cand in candidates:
        if (cand / "include" / "cuda_runtime.h").exists() and (cand / "bin" / "nvcc").exists():
            return str(cand)
    return None


def _arch_flags():
    """Explicit -gencode flags from TORCH_CUDA_ARCH_LIST ("9.0a;10.0a", "8.0+PTX", ...)."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not archs:
        archs = DEFAULT_ARCHS
        try:
            import torch

            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                # Arch-specific ("a") targets for Hopper / Blackwell datacenter parts.
                suffix = "a" if (major, minor) in ((9, 0), (10, 0)) else ""
                archs = f"{major}.{minor}{suffix}"
        except Exception:  # noqa: BLE001 - any failure: keep the default list
            pass
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    flags = []
    for entry in re.split(r"[;\s,]+", archs):
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        entry = entry[: -len("+PTX")] if ptx else entry
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", entry)
        if m is None:
            raise RuntimeError(f"TORCH_CUDA_ARCH_LIST: cannot parse {entry!r}")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return archs, flags


def _shared_ptr_flags(cuda_home):
    """[SHARED_PTR_FLAG] when this nvcc takes it and it gives 64-bit shared
    addresses (cicc's options are not a public interface), else [] and a line."""
    probe = ("__global__ void k(float* p) { __shared__ float s[32];\n"
             "  s[threadIdx.x] = *p; __syncthreads(); *p = s[31 - threadIdx.x]; }\n")
    with tempfile.TemporaryDirectory() as tmp:
        src, ptx = Path(tmp) / "probe.cu", Path(tmp) / "probe.ptx"
        src.write_text(probe)
        res = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), SHARED_PTR_FLAG, "-ptx",
                              str(src), "-o", str(ptx)], capture_output=True, text=True)
        if res.returncode == 0 and re.search(r"st\.shared\.f32\s+\[%rd", ptx.read_text()):
            return [SHARED_PTR_FLAG]
    _say(f"nvcc does not take {SHARED_PTR_FLAG}: the kernels keep 32-bit shared pointers "
         "and their registers may differ from the NVRTC path's")
    return []


def _extension():
    if os.environ.get("DFLASH_KERNELS_NO_EXTENSION", "0") not in ("", "0"):
        _say("DFLASH_KERNELS_NO_EXTENSION is set: pure-Python install (no dflash_kernels._C)")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        _say("no CUDA toolkit (nvcc) found: pure-Python install (no dflash_kernels._C)")
        return [], {}
    # cpp_extension reads CUDA_HOME when it is imported.
    os.environ.setdefault("CUDA_HOME", cuda_home)
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        _say("PyTorch is not importable at build time: pure-Python install (no dflash_kernels._C)")
        return [], {}
    if torch.version.cuda is None:
        _say("PyTorch is not a CUDA build: pure-Python install (no dflash_kernels._C)")
        return [], {}
    archs, gencode = _arch_flags()
    nvcc_threads = os.environ.get("NVCC_THREADS", "2")
    sm_targets = "_".join(f.split("code=sm_")[1] for f in gencode if "code=sm_" in f)
    _say(f"building dflash_kernels._C for {archs} with {cuda_home}/bin/nvcc")
    csrc = ROOT / "csrc"
    ext = CUDAExtension(
        name="dflash_kernels._C",
        # The kernels' entry points (csrc/*.cu) and the PyTorch bindings (csrc/bindings/).
        sources=[os.path.relpath(path, ROOT)
                 for path in sorted(csrc.glob("*.cu")) + sorted((csrc / "bindings").glob("*.cpp"))],
        include_dirs=[str(csrc)],
        extra_compile_args={
            # The SASS targets, e.g. 90a_100a (one pp-number token: no shell quoting).
            "cxx": ["-O3", f"-DDFLASH_KERNELS_SM_TARGETS={sm_targets}"],
            # No --use_fast_math: it turns logf into __logf and would change the noise.
            "nvcc": ["-O3", "-lineinfo", *_shared_ptr_flags(cuda_home), f"--threads={nvcc_threads}",
                     *gencode],
        },
    )
    return [ext], {"build_ext": BuildExtension}


def _with_kernel_sources(cmdclass):
    """Wheels carry the header-only kernels as dflash_kernels/_csrc (csrc/*.cuh,
    *.h and jit/), which the cuda backend compiles with NVRTC when _C is absent
    (docs/cuda.md, "No-build path (NVRTC)")."""
    from setuptools.command.build_py import build_py

    class BuildPyWithKernelSources(build_py):
        def run(self):
            super().run()
            dest = Path(self.build_lib) / "dflash_kernels" / "_csrc"
            csrc = ROOT / "csrc"
            for src in [*csrc.glob("*.cuh"), *csrc.glob("*.h"), *(csrc / "jit").glob("*")]:
                target = dest / src.relative_to(csrc)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)

    return {**cmdclass, "build_py": BuildPyWithKernelSources}


ext_modules, cmdclass = _extension()
setup(ext_modules=ext_modules, cmdclass=_with_kernel_sources(cmdclass))
