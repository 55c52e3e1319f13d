"""NVRTC compilation of the header-only kernels of ``csrc/`` (the no-build cuda path).

When ``dflash_kernels._C`` was not built (a pure-Python install), the cuda
backend compiles the kernel templates of ``csrc/*.cuh`` at first use with
NVRTC (through ``cuda.bindings``) for the device's architecture, caches the
cubins on disk and launches them through the driver API (``_jit.py``).

This module is the compiler and its cache; it needs no GPU. One NVRTC program
per op (``csrc/jit/<op>.cu``, which only includes the op's ``.cuh``), with
exactly the template instantiations the op's launch dispatch
(``verify::dispatch``, ``writekv::dispatch``) launches, as name expressions,
so each cubin holds the same kernels, under the same mangled names, as the
nvcc build. NVRTC ships no C++ standard library: ``csrc/jit/std_shim.h``
stands in for the few standard headers the kernel headers include.

Cache: ``$DFLASH_KERNELS_CACHE`` or ``$XDG_CACHE_HOME/dflash_kernels`` (default
``~/.cache/dflash_kernels``), under ``nvrtc/``; an unwritable cache warns and
compiles in memory; one ``<op>-<arch>-<key>.cubin`` and its ``.json`` (the lowered
names) per entry, the key a hash of (every csrc source the program can
include, the arch, the NVRTC version, the CUDA headers, the options, the
instantiations). Files are written to a temporary name and renamed
(``os.replace``), so concurrent threads or processes never see half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

CACHE_ENV = "DFLASH_KERNELS_CACHE"
CSRC_ENV = "DFLASH_KERNELS_CSRC"

OPS = ("verify_chain", "write_kv")

# The instantiations each launch dispatch can launch (csrc/verify_chain.cuh
# verify::dispatch: logits dtype x token dtype; csrc/write_kv.cuh
# writekv::dispatch_*: activation dtype x cache kind x head dim).
_ACT = {"fp16": "__half", "bf16": "__nv_bfloat16"}
_KIND = {"same": "kSame", "e4m3": "kE4M3", "e5m2": "kE5M2"}

KERNELS: Dict[str, Dict[tuple, str]] = {
    "verify_chain": {
        **{("split_argmax", dt): f"dflash::verify::split_argmax_kernel<{ct}>"
           for dt, ct in (("fp32", "float"), ("fp16", "__half"), ("bf16", "__nv_bfloat16"))},
        **{("accept", tok): f"dflash::verify::accept_kernel<{ct}>"
           for tok, ct in (("int32", "int32_t"), ("int64", "int64_t"))},
    },
    "write_kv": {
        ("write_kv", act, d, kind): (f"dflash::writekv::write_kv_kernel<{ct}, {d}, "
                                     f"dflash::writekv::CacheKind::{ck}>")
        for act, ct in _ACT.items() for d in (64, 128, 256) for kind, ck in _KIND.items()
    },
}

# The device-code flags of the nvcc build (setup.py: -O3 -lineinfo, no fast math;
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS; -std=c++17). NVRTC optimizes by
# default (its -O3), and -fmad / -prec-div / -ftz keep nvcc's defaults. NVRTC has
# no --expt-relaxed-constexpr (it changes which calls compile, not the code).
# Shared-memory pointers: NVRTC's front end makes them 64-bit and has no option
# for nvcc's 32-bit default (cicc --sharedmem32); the width changes the address
# arithmetic ptxas gets, so the nvcc build takes -Xcicc=--sharedmem32=0 (setup.py,
# CMakeLists.txt) and both give the same registers (tests/test_cuda_nvrtc.py).
COMMON_OPTIONS = (
    "-std=c++17",
    "-lineinfo",
    # The host side of the headers (guards, params fill, launch declarations) has
    # no annotations, and NVRTC refuses host functions; as __device__ functions
    # nothing calls they generate no code.
    "-default-device",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)

# Standard headers the kernel headers include; each is handed to NVRTC as std_shim.h.
STD_HEADERS = ("cstdint", "climits", "cfloat", "cmath", "cstring", "cstddef",
               "initializer_list", "type_traits")


class NVRTCUnavailable(ImportError):
    """cuda.bindings, NVRTC, the CUDA headers or csrc/ is missing."""


class CompileError(RuntimeError):
    """NVRTC rejected the program; the message holds its log."""


def csrc_dir() -> Path:
    """The kernel sources: ``$DFLASH_KERNELS_CSRC``, a copy packaged as
    ``dflash_kernels/_csrc``, or the repository's ``csrc/`` (source and editable installs)."""
    env = os.environ.get(CSRC_ENV)
    pkg = Path(__file__).resolve().parent.parent
    for cand in ([Path(env)] if env else []) + [pkg / "_csrc", pkg.parent / "csrc"]:
        if (cand / "jit" / "std_shim.h").is_file():
            return cand
    raise NVRTCUnavailable(f"the kernel sources (csrc/ with csrc/jit/) were not found "
                           f"(looked in {pkg / '_csrc'} and {pkg.parent / 'csrc'}; set {CSRC_ENV})")


def cuda_include_dir() -> Path:
    """The CUDA headers (cuda_fp16.h, cuda_runtime_api.h, ...): ``CUDA_HOME`` /
    ``CUDA_PATH``, the pip wheels' (found by cuda.pathfinder), /usr/local/cuda."""
    cands = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH")
             if os.environ.get(v)]
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("cudart")
        if found:
            cands.append(Path(found))
    except Exception:  # noqa: BLE001 - an older cuda.pathfinder, or none
        pass
    cands.append(Path("/usr/local/cuda/include"))
    for cand in cands:
        if (cand / "cuda_fp16.h").is_file() and (cand / "cuda_runtime_api.h").is_file():
            return cand
    raise NVRTCUnavailable("the CUDA headers (cuda_fp16.h, cuda_runtime_api.h) were not found: "
                           "install nvidia-cuda-runtime (a dependency of CUDA builds of torch) "
                           "or set CUDA_HOME")


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise NVRTCUnavailable(f"cuda.bindings is not importable ({exc}); "
                               "pip install cuda-bindings") from exc
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as exc:  # noqa: BLE001 - libnvrtc missing or too old
        raise NVRTCUnavailable(f"NVRTC could not be loaded ({type(exc).__name__}: {exc})") from exc
    if int(err) != 0:
        raise NVRTCUnavailable(f"nvrtcVersion failed ({err})")
    return nvrtc, (major, minor)


def nvrtc_version() -> Tuple[int, int]:
    return _nvrtc()[1]


def check_available() -> str:
    """Empty when the JIT path can compile, else why not."""
    try:
        _nvrtc()
        csrc_dir()
        cuda_include_dir()
    except NVRTCUnavailable as exc:
        return str(exc)
    return ""


def arch_of(capability: Tuple[int, int]) -> str:
    """``sm_90a`` / ``sm_100a`` for Hopper / Blackwell datacenter parts (as setup.py),
    else the plain ``sm_XY``."""
    major, minor = capability
    return f"sm_{major}{minor}" + ("a" if (major, minor) in ((9, 0), (10, 0)) else "")


def options(arch: str) -> Tuple[str, ...]:
    if not re.fullmatch(r"sm_\d+[af]?", arch):
        raise ValueError(f"arch: expected sm_XY[a|f], got {arch!r}")
    csrc = csrc_dir()
    return (f"--gpu-architecture={arch}", *COMMON_OPTIONS, f"-I{csrc}", f"-I{csrc / 'jit'}",
            f"-I{cuda_include_dir()}")


def _source_files() -> Sequence[Path]:
    csrc = csrc_dir()
    return sorted([*csrc.glob("*.cuh"), *csrc.glob("*.h"), *(csrc / "jit").iterdir()])


def _cuda_headers_version() -> str:
    text = (cuda_include_dir() / "cuda_runtime_api.h").read_text(errors="replace")
    m = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", text)
    return m.group(1) if m else "?"


def cache_key(op: str, arch: str) -> str:
    """Hash of everything that decides the cubin (the sources, not their paths)."""
    h = hashlib.sha256()
    for path in _source_files():
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    # Options with the include paths left out: the sources' contents are hashed above.
    opts = [o for o in options(arch) if not o.startswith("-I")]
    meta = [op, arch, nvrtc_version(), _cuda_headers_version(), opts, list(STD_HEADERS),
            sorted(KERNELS[op].values())]
    h.update(json.dumps(meta).encode())
    return h.hexdigest()[:32]


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env) / "nvrtc"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dflash_kernels" / "nvrtc"


@dataclass(frozen=True)
class Compiled:
    op: str
    arch: str
    cubin: bytes
    names: Dict[str, str]  # name expression -> lowered (mangled) name
    path: Path             # the cached cubin
    cached: bool           # read from the cache (no NVRTC call)


def _check(result, what, prog=None, nvrtc=None):
    err = result[0] if isinstance(result, tuple) else result
    if int(err) == 0:
        return result[1:] if isinstance(result, tuple) else ()
    log = ""
    if prog is not None:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        buf = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, buf)
        log = buf.decode(errors="replace").rstrip("\0 \n")
    raise CompileError(f"{what} failed ({err}){': ' + log if log else ''}")


def build(op: str, arch: str) -> Tuple[bytes, Dict[str, str], str]:
    """One NVRTC compile of ``op``'s program for ``arch``: (cubin, lowered names, log)."""
    nvrtc, _ = _nvrtc()
    csrc = csrc_dir()
    entry = csrc / "jit" / f"{op}.cu"
    shim = (csrc / "jit" / "std_shim.h").read_bytes()
    prog, = _check(nvrtc.nvrtcCreateProgram(entry.read_bytes(), f"{op}.cu".encode(),
                                            len(STD_HEADERS), [shim] * len(STD_HEADERS),
                                            [h.encode() for h in STD_HEADERS]),
                   "nvrtcCreateProgram")
    try:
        exprs = list(KERNELS[op].values())
        for expr in exprs:
            _check(nvrtc.nvrtcAddNameExpression(prog, expr.encode()), "nvrtcAddNameExpression")
        opts = [o.encode() for o in options(arch)]
        _check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), f"NVRTC ({op}, {arch})", prog,
               nvrtc)
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        size, = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        names = {}
        for expr in exprs:
            lowered, = _check(nvrtc.nvrtcGetLoweredName(prog, expr.encode()),
                              "nvrtcGetLoweredName")
            names[expr] = lowered.decode() if isinstance(lowered, bytes) else str(lowered)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return cubin, names, log.decode(errors="replace").rstrip("\0 \n")


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


_locks: Dict[tuple, threading.Lock] = {}
_locks_guard = threading.Lock()


def compile_op(op: str, arch: str, cache: Optional[Path] = None) -> Compiled:
    """``op``'s kernels for ``arch``, from the disk cache or compiled now (and cached)."""
    if op not in KERNELS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    root = Path(cache) if cache is not None else cache_dir()
    key = cache_key(op, arch)
    cubin_path = root / f"{op}-{arch}-{key}.cubin"
    meta_path = cubin_path.with_suffix(".json")
    with _locks_guard:
        lock = _locks.setdefault((str(root), op, arch, key), threading.Lock())
    with lock:
        # The .json is written last: when it is there, the cubin is complete.
        try:
            meta = json.loads(meta_path.read_text())
            cubin = cubin_path.read_bytes()
            if hashlib.sha256(cubin).hexdigest() == meta["sha256"] and meta["key"] == key:
                return Compiled(op, arch, cubin, dict(meta["names"]), cubin_path, True)
        except (OSError, ValueError, KeyError):
            pass
        cubin, names, _ = build(op, arch)
        meta = dict(key=key, op=op, arch=arch, nvrtc=list(nvrtc_version()), names=names,
                    sha256=hashlib.sha256(cubin).hexdigest())
        try:
            root.mkdir(parents=True, exist_ok=True)
            _write_atomic(cubin_path, cubin)
            _write_atomic(meta_path, json.dumps(meta, indent=1).encode())
        except OSError as exc:  # a read-only home: compile again next process
            warnings.warn(f"dflash_kernels: the NVRTC cache {root} is not writable ({exc}); "
                          f"set {CACHE_ENV}", RuntimeWarning, stacklevel=2)
        return Compiled(op, arch, cubin, names, cubin_path, False)
