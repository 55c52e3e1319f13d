"""The no-build cuda path (dflash_kernels/cuda/_nvrtc.py, _jit.py), mostly without a GPU.

- NVRTC (no driver needed) compiles every kernel of csrc/ for sm_90a and
  sm_100a; the lowered names are the instantiations' manglings, the cubins hold
  the same kernels as the nvcc-built extension (cuobjdump) with one parameter
  of the size of the ctypes params block, no stack and no local memory, and
  each kernel the extension's registers, stack, shared and local memory and
  spill code (none) exactly.
- The disk cache is reused (a second call compiles nothing), keyed (option,
  arch, source changes give new entries), checked (a corrupt entry is rebuilt)
  and safe under concurrent writers (threads and processes).
- The Python host path (params blocks, kernel choice, grids, block sizes,
  dynamic shared memory) equals the C++ one: csrc/'s verify_chain_params /
  write_kv_launches and verify::dispatch / writekv::dispatch built with g++
  (host_emulation.h) and run with a launcher that records, field by field, with
  the struct layouts compared by offsetof; and what reaches cuLaunchKernel
  (through a recording stand-in for cuda.bindings.driver) is that block.
- The registry offers the NVRTC path as the cuda backend exactly when _C is
  absent (or DFLASH_KERNELS_CUDA_JIT=1) and a device and cuda.bindings are there.
- On a GPU (skipped here): JIT outputs equal the extension's and the reference's.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import dflash_kernels
from dflash_kernels import _registry


def _load_helpers():
    """_jit and _nvrtc. Without _C and a device, the package dflash_kernels.cuda
    refuses to import (the registry's "unavailable"); its helpers load anyway
    under a stand-in parent that is dropped again, so the registry still sees
    the real package."""
    try:
        from dflash_kernels.cuda import _jit, _nvrtc
        return _jit, _nvrtc
    except ImportError:
        pass
    import types

    stub = types.ModuleType("dflash_kernels.cuda")
    stub.__path__ = [str(Path(dflash_kernels.__file__).parent / "cuda")]
    sys.modules["dflash_kernels.cuda"] = stub
    try:
        return (importlib.import_module("dflash_kernels.cuda._jit"),
                importlib.import_module("dflash_kernels.cuda._nvrtc"))
    finally:
        del sys.modules["dflash_kernels.cuda"]
        if getattr(dflash_kernels, "cuda", None) is stub:
            del dflash_kernels.cuda


_jit, _nvrtc = _load_helpers()

REASON = _nvrtc.check_available()
if REASON:
    pytest.skip(f"the NVRTC path cannot compile here: {REASON}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ARCHS = ("sm_90a", "sm_100a")
STRUCTS = {"verify_chain": _jit.VerifyChainParams, "write_kv": _jit.WriteKVParams}


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("nvrtc_cache")


@pytest.fixture(scope="session")
def compiled(cache):
    """Every op for both archs, compiled once per session into a temporary cache."""
    return {(op, arch): _nvrtc.compile_op(op, arch, cache) for op in _nvrtc.OPS for arch in ARCHS}


def _cuobjdump(*args):
    import triton

    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not exe.exists():
        pytest.skip(f"triton's bundled cuobjdump is missing ({exe})")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                          check=True).stdout


def _per_function(args, path, arch, header, on_line):
    """Walk cuobjdump's output section by section: ``arch = sm_..`` lines set
    the arch (a bare cubin names none: ``arch``), ``header`` (a regex with the
    mangled name as group 1) starts a function, and ``on_line(rows, key,
    line)`` reads each line under it. Returns ``rows``."""
    rows, key = {}, None
    for line in _cuobjdump(*args, path).splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        m = re.match(header, line)
        if m:
            key = (arch, m.group(1))
        elif key:
            on_line(rows, key, line)
    return rows


def _resources(path, arch=None):
    """{(arch, mangled name): (REG, STACK, SHARED, LOCAL)} from cuobjdump."""
    def read(rows, key, line):
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and key not in rows:
            rows[key] = tuple(map(int, m.groups()))
    return _per_function(["--dump-resource-usage"], path, arch, r"\s*Function (\S+):", read)


def _spill_code(path, arch=None):
    """{(arch, mangled name): number of LDL / STL (local-memory loads and stores:
    the spill code) in its SASS} from cuobjdump."""
    def read(rows, key, line):
        rows.setdefault(key, 0)
        if re.search(r"\b(LDL|STL)(\.\w+)*\s", line):
            rows[key] += 1
    return _per_function(["-sass"], path, arch, r"\s*Function : (\S+)", read)


# ---------------------------------------------------------------- compilation


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("op", _nvrtc.OPS)
def test_every_instantiation_compiles_with_its_mangled_name(compiled, op, arch):
    c = compiled[(op, arch)]
    assert c.cubin[:4] == b"\x7fELF"
    assert set(c.names) == set(_nvrtc.KERNELS[op].values())
    assert len(set(c.names.values())) == len(c.names)
    cxxfilt = shutil.which("c++filt")
    for expr, lowered in c.names.items():
        assert lowered.startswith("_ZN6dflash"), (expr, lowered)
        if cxxfilt is None:
            continue
        demangled = subprocess.run([cxxfilt, lowered], capture_output=True, text=True,
                                   check=True).stdout.strip()
        want = expr.replace("int32_t", "int").replace("int64_t", "long")
        for i, kind in enumerate(("kSame", "kE4M3", "kE5M2")):
            want = want.replace(f"dflash::writekv::CacheKind::{kind}",
                                f"(dflash::writekv::CacheKind){i}")
        assert demangled == f"void {want}(dflash::{STRUCTS[op].__name__})", (expr, demangled)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("op", _nvrtc.OPS)
def test_cubin_kernels_take_the_ctypes_params_block(compiled, op, arch):
    """One kernel parameter each, of the size of the ctypes structure (the
    device's view of the layout), no stack, no local memory, <= 64 registers."""
    c = compiled[(op, arch)]
    elf = _cuobjdump("-elf", c.path)
    assert re.search(r"ELF: .*\bsm=(\w+),", elf).group(1) == arch[3:]
    rows = _resources(c.path, arch)
    assert {name for _, name in rows} == set(c.names.values())
    for (_, name), (reg, stack, _shared, local) in rows.items():
        assert stack == 0 and local == 0 and reg <= 64, (name, reg, stack, local)
    sizes, section = {}, None
    for line in elf.splitlines():
        if line.startswith(".nv.info._Z"):
            section = line[len(".nv.info."):].strip()
        m = re.search(r"Ordinal : 0x(\w+)\s+Offset\s*: 0x(\w+)\s+Size\s*: 0x(\w+)", line)
        if m and section:
            sizes.setdefault(section, []).append(tuple(int(x, 16) for x in m.groups()))
    assert set(sizes) == set(c.names.values())
    for name, params in sizes.items():
        assert params == [(0, 0, ctypes.sizeof(STRUCTS[op]))], (name, params)


def test_cubins_hold_the_kernels_of_the_extension(compiled):
    """Every kernel of every arch the extension holds: the same registers, stack,
    shared and local memory, and as much spill code (none). The nvcc build takes
    -Xcicc=--sharedmem32=0 (setup.py, CMakeLists.txt): NVRTC's shared-memory
    pointers are 64-bit, nvcc's 32-bit by default, and with 32-bit ones write_kv
    took 48 registers on sm_90a (NVRTC 45) and 40 on sm_100a (NVRTC 48)."""
    try:
        from dflash_kernels import _C
    except ImportError as exc:
        pytest.skip(f"dflash_kernels._C is not built ({exc})")
    built, built_spills = _resources(_C.__file__), _spill_code(_C.__file__)
    jit, jit_spills = {}, {}
    for c in compiled.values():
        jit.update(_resources(c.path, c.arch))
        jit_spills.update(_spill_code(c.path, c.arch))
    archs = [arch for arch in ARCHS if arch in {a for a, _ in built}]
    if not archs:
        pytest.skip(f"the extension holds none of {ARCHS}")
    for arch in archs:
        mine = {k: v for k, v in jit.items() if k[0] == arch}
        theirs = {k: v for k, v in built.items() if k[0] == arch}
        assert len(mine) == 23 and set(mine) == set(theirs), arch
        # (REG, STACK, SHARED, LOCAL) per kernel, no tolerance.
        differ = {k[1]: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
        assert not differ, (f"{arch}: NVRTC (REG, STACK, SHARED, LOCAL) vs the extension's; "
                            f"was _C built with setup.py's nvcc flags? {differ}")
        for key in mine:
            assert jit_spills[key] == built_spills[key] == 0, (key, jit_spills[key],
                                                              built_spills[key])


SHARED_PTR_FLAG = "-Xcicc=--sharedmem32=0"
SHARED_PROBE = """extern "C" __global__ void k(float* p) {
  __shared__ float s[32];
  s[threadIdx.x] = *p;
  __syncthreads();
  *p = s[31 - threadIdx.x];
}
"""


def _shared_address_width(ptx):
    widths = {"rd": 64, "r": 32}
    pattern = r"(?:ld|st)\.shared\.f32\s+(?:%f\d+,\s*)?\[%(rd|r)\d+"
    found = {widths[w] for w in re.findall(pattern, ptx)}
    assert len(found) == 1, ptx
    return found.pop()


def test_nvcc_builds_take_nvrtcs_shared_pointer_width(tmp_path):
    """What made write_kv's registers differ: NVRTC addresses shared memory with
    64-bit pointers and has no option for nvcc's 32-bit default (cicc
    --sharedmem32); setup.py and CMakeLists.txt give nvcc NVRTC's width."""
    setup = (ROOT / "setup.py").read_text()
    assert f'SHARED_PTR_FLAG = "{SHARED_PTR_FLAG}"' in setup
    assert "*_shared_ptr_flags(cuda_home)" in setup
    assert (ROOT / "CMakeLists.txt").read_text().count(SHARED_PTR_FLAG) == 2
    nvrtc, _ = _nvrtc._nvrtc()
    err, prog = nvrtc.nvrtcCreateProgram(SHARED_PROBE.encode(), b"probe.cu", 0, [], [])
    assert int(err) == 0, err
    try:
        opts = [f"--gpu-architecture={ARCHS[0]}".encode()]
        assert int(nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]) == 0
        _, size = nvrtc.nvrtcGetPTXSize(prog)
        ptx = b" " * size
        nvrtc.nvrtcGetPTX(prog, ptx)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    assert _shared_address_width(ptx.decode(errors="replace")) == 64
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    src = tmp_path / "probe.cu"
    src.write_text(SHARED_PROBE)
    widths = []
    for flags in ([], [SHARED_PTR_FLAG]):
        out = tmp_path / f"probe{len(flags)}.ptx"
        subprocess.run([nvcc, f"-arch={ARCHS[0]}", *flags, "-ptx", str(src), "-o", str(out)],
                       check=True, capture_output=True)
        widths.append(_shared_address_width(out.read_text()))
    assert widths == [32, 64]


# ---------------------------------------------------------------- the cache


def test_second_call_reads_the_cache(compiled, cache, monkeypatch):
    def no_build(*a):
        raise AssertionError("compiled again")

    monkeypatch.setattr(_nvrtc, "build", no_build)
    for (op, arch), first in compiled.items():
        again = _nvrtc.compile_op(op, arch, cache)
        assert again.cached and not first.cached
        assert again.cubin == first.cubin and again.names == first.names


def _fake_build(calls, delay=0.0):
    def build(op, arch):
        import time

        calls.append((op, arch))
        time.sleep(delay)
        return (f"cubin {op} {arch} {len(calls)}".encode() * 1000,
                {e: f"_Z{i}" for i, e in enumerate(_nvrtc.KERNELS[op].values())}, "")
    return build


def test_cache_is_keyed_by_options_arch_and_sources(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(_nvrtc, "build", _fake_build(calls))
    root = tmp_path / "c"
    first = _nvrtc.compile_op("verify_chain", "sm_90a", root)
    assert _nvrtc.compile_op("verify_chain", "sm_90a", root).cached and len(calls) == 1
    monkeypatch.setattr(_nvrtc, "COMMON_OPTIONS", _nvrtc.COMMON_OPTIONS + ("-DDFLASH_X=1",))
    changed = _nvrtc.compile_op("verify_chain", "sm_90a", root)
    assert not changed.cached and changed.path != first.path and len(calls) == 2
    monkeypatch.undo()
    monkeypatch.setattr(_nvrtc, "build", _fake_build(calls))
    assert _nvrtc.compile_op("verify_chain", "sm_90a", root).cached  # the first entry again
    assert not _nvrtc.compile_op("verify_chain", "sm_100a", root).cached and len(calls) == 3
    # A copy of csrc/ with one header changed: a new key.
    src = tmp_path / "csrc"
    shutil.copytree(CSRC, src)
    (src / "philox.cuh").write_text((src / "philox.cuh").read_text() + "\n// changed\n")
    monkeypatch.setenv(_nvrtc.CSRC_ENV, str(src))
    assert not _nvrtc.compile_op("verify_chain", "sm_90a", root).cached and len(calls) == 4
    assert len(list(root.glob("*.cubin"))) == len(list(root.glob("*.json"))) == 4
    assert not list(root.glob(".*.tmp"))


def test_corrupt_entry_is_rebuilt(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(_nvrtc, "build", _fake_build(calls))
    first = _nvrtc.compile_op("write_kv", "sm_90a", tmp_path)
    first.path.write_bytes(first.cubin[:100])  # a torn file (not what os.replace leaves)
    again = _nvrtc.compile_op("write_kv", "sm_90a", tmp_path)
    assert not again.cached and len(calls) == 2
    assert hashlib.sha256(again.path.read_bytes()).hexdigest() == json.loads(
        again.path.with_suffix(".json").read_text())["sha256"]


def test_unwritable_cache_warns_and_still_compiles(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(_nvrtc, "build", _fake_build(calls))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(RuntimeWarning, match="not writable"):
        c = _nvrtc.compile_op("verify_chain", "sm_90a", blocker / "cache")
    assert not c.cached and c.cubin and len(calls) == 1


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(_nvrtc.CACHE_ENV, str(tmp_path / "a"))
    assert _nvrtc.cache_dir() == tmp_path / "a" / "nvrtc"
    monkeypatch.delenv(_nvrtc.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert _nvrtc.cache_dir() == tmp_path / "x" / "dflash_kernels" / "nvrtc"


def test_concurrent_threads_compile_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(_nvrtc, "build", _fake_build(calls, delay=0.2))
    results = [None] * 8

    def work(i):
        results[i] = _nvrtc.compile_op("verify_chain", "sm_100a", tmp_path)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len({r.cubin for r in results}) == 1


_WRITER = r"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("nvrtc_alone", sys.argv[1])
m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)
tag = sys.argv[3]
def build(op, arch):
    time.sleep(0.05)
    return (tag.encode() * 200000, {e: "_Z" + tag for e in m.KERNELS[op].values()}, "")
m.build = build
for _ in range(5):
    c = m.compile_op("write_kv", "sm_90a", sys.argv[2])
    assert c.cubin == (c.names[next(iter(c.names))][2:]).encode() * 200000, "torn entry"
"""


def test_concurrent_processes_never_see_a_torn_entry(tmp_path):
    """Four processes (the module alone: it needs only the standard library)
    compile one key at once with different payloads: each always gets a
    consistent (cubin, names) pair, and no temporary file is left."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {"PATH": "/usr/bin:/bin", _nvrtc.CSRC_ENV: str(CSRC)}
    procs = [subprocess.Popen([sys.executable, str(script), _nvrtc.__file__, str(tmp_path / "c"),
                               tag], env=env, stderr=subprocess.PIPE, text=True)
             for tag in "ABCD"]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert not list((tmp_path / "c").glob(".*.tmp"))


# ---------------------------------------------------------------- host path vs C++

_RECORDER = r"""
// The emulator's entry points (desc(), DescList: the tensors as 13 int64 words,
// host_emulation.h, the op headers), plus a launcher that records.
#include "testing/emulate.cpp"
#include <cstddef>
namespace {
const void* const kKernels[] = {KERNEL_TABLE};
// Per launch: kernel index, grid, threads, smem (info), then the params bytes (blob).
struct Record {
  int64_t* info; unsigned char* blob; int64_t* n;
  template <typename Kernel, typename Params>
  cudaError_t operator()(Kernel kernel, unsigned grid, unsigned threads, size_t smem,
                         const Params& p) const {
    int64_t id = -1;
    for (size_t i = 0; i < sizeof(kKernels) / sizeof(kKernels[0]); ++i)
      if (kKernels[i] == reinterpret_cast<const void*>(kernel)) id = static_cast<int64_t>(i);
    int64_t* row = info + 4 * *n;
    row[0] = id; row[1] = grid; row[2] = threads; row[3] = static_cast<int64_t>(smem);
    std::memcpy(blob + sizeof(Params) * *n, &p, sizeof(Params));
    ++*n;
    return cudaSuccess;
  }
};
}  // namespace
extern "C" {
void rec_layout(int64_t* out) { LAYOUT }
const char* rec_verify_chain(const int64_t* t, int num_sms, int64_t workspace, int64_t* info,
                             unsigned char* blob, int64_t* n) {
  auto at = [&](int i) { return desc(t + i * 13); };
  const VerifyChainArgs args{at(0), at(1), at(2), at(3), at(4), at(5), at(6),
                             at(7), at(8), at(9), at(10), at(11), at(12), at(13)};
  VerifyChainParams p;
  std::memset(&p, 0, sizeof(p));
  if (const char* err = verify_chain_params(args, num_sms, p)) return err;
  if (p.batch == 0) return nullptr;
  set_verify_chain_workspace(p, reinterpret_cast<void*>(workspace));
  return verify::dispatch(p, Record{info, blob, n}) == cudaSuccess ? nullptr : "dispatch failed";
}
const char* rec_write_kv(const int64_t* t, int64_t layers, double eps, int neox, int64_t rot,
                         int64_t* info, unsigned char* blob, int64_t* n) {
  auto at = [&](int i) { return desc(t + i * 13); };
  const int64_t* caches = t + 8 * 13;
  const WriteKVArgs<DescList> args{at(0), at(1), at(2), at(3), at(4), DescList{caches, layers},
                                   DescList{caches + layers * 13, layers}, at(5), eps, neox != 0,
                                   rot, at(6), at(7)};
  const char* failed = nullptr;
  const char* err = write_kv_launches(args, [&](const WriteKVParams& p) {
    if (writekv::dispatch(p, Record{info, blob, n}) != cudaSuccess) failed = "dispatch failed";
  });
  return err != nullptr ? err : failed;
}
}
"""

KERNEL_LIST = [(op, e) for op in _nvrtc.OPS for e in _nvrtc.KERNELS[op].values()]


def _layout_fields():
    out = []
    for name, struct in (("VerifyChainParams", _jit.VerifyChainParams),
                         ("WriteKVParams", _jit.WriteKVParams)):
        out.append((f"sizeof({name})", ctypes.sizeof(struct)))
        for field, _ in struct._fields_:
            out.append((f"offsetof({name}, {field})", getattr(struct, field).offset))
    return out


def _toolkit_include():
    """CUDA toolkit headers g++ can build host_emulation.h with (the pip
    wheels' lack crt/host_defines.h, which NVRTC has built in)."""
    import os

    cands = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(Path(os.path.realpath(nvcc)).parent.parent)
    cands.append(Path("/usr/local/cuda"))
    for c in cands:
        if (c / "include" / "cuda_fp8.h").exists() and (c / "include" / "crt").is_dir():
            return c / "include"
    return None


@pytest.fixture(scope="session")
def recorder(tmp_path_factory):
    cxx, inc = shutil.which("g++"), _toolkit_include()
    if cxx is None or inc is None:
        pytest.skip("the C++ host path needs g++ and the CUDA toolkit headers")
    fields = _layout_fields()
    src = (_RECORDER.replace("KERNEL_TABLE", ", ".join(
        f"reinterpret_cast<const void*>(&{e})" for _, e in KERNEL_LIST))
        .replace("LAYOUT", " ".join(f"out[{i}] = {f};" for i, (f, _) in enumerate(fields))))
    d = tmp_path_factory.mktemp("recorder")
    (d / "recorder.cpp").write_text(src)
    so = d / "recorder.so"
    res = subprocess.run([cxx, "-std=c++20", "-O0", "-fPIC", "-shared", "-fno-strict-aliasing",
                          "-Wno-invalid-offsetof", f"-I{inc}", f"-I{CSRC}",
                          str(d / "recorder.cpp"), "-o", str(so), "-lpthread"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    lib = ctypes.CDLL(str(so))
    lib.rec_verify_chain.restype = ctypes.c_char_p
    lib.rec_write_kv.restype = ctypes.c_char_p
    lib.rec_write_kv.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int,
                                 ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.rec_verify_chain.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def test_ctypes_layouts_equal_the_cpp_structs(recorder):
    fields = _layout_fields()
    out = (ctypes.c_int64 * len(fields))()
    recorder.rec_layout(out)
    assert [(f, out[i]) for i, (f, _) in enumerate(fields)] == fields


def _desc(t):
    if t is None:
        return [0] * 13
    pad = lambda xs: list(xs)[:4] + [0] * (4 - min(len(xs), 4))  # noqa: E731
    return [t.data_ptr(), 1, _jit.DTYPE.get(t.dtype, -1), 0, t.dim(), *pad(t.shape),
            *pad(t.stride())]


def _words(tensors):
    return torch.tensor([w for t in tensors for w in _desc(t)], dtype=torch.int64)


def _cpp_launches(struct, info, blob, n):
    out = []
    for i in range(n.value):
        kid, grid, threads, smem = info[4 * i: 4 * i + 4]
        size = ctypes.sizeof(struct)
        params = struct.from_buffer_copy(bytes(blob[size * i: size * (i + 1)]))
        out.append((KERNEL_LIST[kid][1], grid, threads, smem, _fields(params)))
    return out


def _fields(p):
    return {f: (list(getattr(p, f)) if isinstance(getattr(p, f), ctypes.Array) else getattr(p, f))
            for f, _ in p._fields_}


def _py_launches(launches):
    return [(x.kernel, x.grid, x.threads, x.smem, _fields(x.params)) for x in launches]


WORKSPACE = 0x7F0000001000


def _verify_case(dtype=torch.float32, tok=torch.int32, B=3, S=5, V=9000, sampled=True,
                 seq=True, offset=0):
    g = torch.Generator().manual_seed(B * 100 + S)
    base = torch.empty(B * S * V + offset, dtype=dtype)
    logits = base[offset:].view(B, S, V)
    args = dict(
        logits=logits, block_tokens=torch.randint(0, V, (B, S), generator=g).to(tok),
        num_drafts=torch.randint(0, S, (B,), generator=g).int(),
        temperature=torch.rand(B) if sampled else None, top_k=None, top_p=None,
        seeds=torch.arange(B) if sampled else None, positions=torch.arange(B) if sampled else None,
        draft_probs=None, seq_lens=torch.arange(B).int() if seq else None,
        accept_len=torch.empty(B, dtype=torch.int32),
        out_tokens=torch.empty(B, S, dtype=torch.int32),
        bonus=torch.empty(B, dtype=torch.int32),
        new_seq_lens=torch.empty(B, dtype=torch.int32) if seq else None)
    return args


def _run_cpp_verify(recorder, args, num_sms):
    info, blob, n = (ctypes.c_int64 * 16)(), (ctypes.c_ubyte * 4096)(), ctypes.c_int64(0)
    words = _words(list(args.values()))
    err = recorder.rec_verify_chain(words.data_ptr(), num_sms, WORKSPACE, info, blob,
                                    ctypes.byref(n))
    assert err is None, err
    return _cpp_launches(_jit.VerifyChainParams, info, blob, n)


def _py_verify(args, num_sms):
    p = _jit.verify_chain_params(*args.values(), num_sms=num_sms)
    _jit.set_verify_chain_workspace(p, WORKSPACE)
    return _jit.verify_dispatch(p)


def _case_id(case):
    return ",".join(f"{k}={v}" for k, v in case.items()) or "default"


VERIFY_CASES = [
    dict(),
    dict(dtype=torch.float16, tok=torch.int64, sampled=False, seq=False),
    dict(dtype=torch.bfloat16, V=151936, B=2, S=3),
    dict(dtype=torch.float16, offset=3),      # misaligned base: scalar path
    dict(dtype=torch.float32, V=1001),         # odd row stride: scalar path
    dict(B=1, S=1, V=1, sampled=False),
]


@pytest.mark.parametrize("num_sms", [8, 132])
@pytest.mark.parametrize("case", VERIFY_CASES, ids=_case_id)
def test_verify_chain_host_path_equals_cpp(recorder, case, num_sms):
    args = _verify_case(**case)
    want = _run_cpp_verify(recorder, args, num_sms)
    got = _py_launches(_py_verify(args, num_sms))
    assert len(want) == 2 and got == want


def _write_kv_case(act=torch.float16, cache=None, N=5, L=3, H=2, D=64, layout="stacked", R=32,
                   norm=True, norm_dtype=torch.float32):
    cache = cache or act
    k = torch.empty(N, L, H, D, dtype=act)
    v = torch.empty(N, L, H, D, dtype=act)[:, :, :, :]
    P, page = 4, 4
    if layout == "stacked":
        stack = torch.empty(L, P, page, H, D, dtype=cache)
        kc = list(stack.unbind(0))
        vc = list(torch.empty(L, P, page, H, D, dtype=cache).unbind(0))
    else:  # separate allocations: pointer tables
        kc = [torch.empty(P, page, H, D, dtype=cache) for _ in range(L)]
        vc = [torch.empty(P, page, H, D, dtype=cache) for _ in range(L)]
    fp8 = cache in (torch.float8_e4m3fn, torch.float8_e5m2)
    return dict(k=k, v=v, k_norm_weight=torch.empty(L, D, dtype=norm_dtype) if norm else None,
                positions=torch.zeros(N, dtype=torch.int64),
                slot_mapping=torch.zeros(N, dtype=torch.int64), k_caches=kc, v_caches=vc,
                cos_sin_cache=torch.empty(7, R), eps=1e-6, rope_neox=True, rotary_dim=R,
                k_scale=torch.ones(1) if fp8 else None, v_scale=torch.ones(1) if fp8 else None)


def _run_cpp_write_kv(recorder, a):
    size = ctypes.sizeof(_jit.WriteKVParams)
    info, blob, n = (ctypes.c_int64 * 64)(), (ctypes.c_ubyte * (size * 16))(), ctypes.c_int64(0)
    words = _words([a["k"], a["v"], a["k_norm_weight"], a["positions"], a["slot_mapping"],
                    a["cos_sin_cache"], a["k_scale"], a["v_scale"], *a["k_caches"],
                    *a["v_caches"]])
    err = recorder.rec_write_kv(words.data_ptr(), len(a["k_caches"]), a["eps"], a["rope_neox"],
                                a["rotary_dim"], info, blob, ctypes.byref(n))
    assert err is None, err
    return _cpp_launches(_jit.WriteKVParams, info, blob, n)


def _py_write_kv(a):
    return [x for x in map(_jit.write_kv_dispatch, _jit.write_kv_launches(**a)) if x is not None]


WRITE_KV_CASES = [
    dict(),
    dict(act=torch.bfloat16, cache=torch.float8_e4m3fn, D=128, norm=False),
    dict(act=torch.float16, cache=torch.float8_e5m2, D=256, norm_dtype=torch.bfloat16, R=0),
    dict(layout="separate", L=3),
    dict(layout="separate", L=34, N=2, H=1),   # two launches, stale table entries
    dict(L=34, N=2, H=1),   # one uniform launch past the 32-entry table (filled to 32 only)
    dict(N=0),
]


@pytest.mark.parametrize("case", WRITE_KV_CASES, ids=_case_id)
def test_write_kv_host_path_equals_cpp(recorder, case):
    a = _write_kv_case(**case)
    want = _run_cpp_write_kv(recorder, a)
    got = _py_write_kv(a)
    assert _py_launches(got) == want
    n = case.get("N", 5)
    two = case.get("layout") == "separate" and case.get("L") == 34
    assert len(want) == (0 if n == 0 else 2 if two else 1)


def test_write_kv_uniform_caches_past_32_layers_one_launch():
    """Uniform caches take one launch for any L; the port fills table entry 0 only."""
    a = _write_kv_case(L=34, N=2, H=1)
    (launch,) = _py_write_kv(a)
    p = launch.params
    assert p.k_uniform and p.v_uniform and p.num_layers == 34
    assert p.k_cache_base[0] == a["k_caches"][0].data_ptr() and not any(p.k_cache_base[1:])
    assert p.v_cache_base[0] == a["v_caches"][0].data_ptr() and not any(p.v_cache_base[1:])
    assert p.k_layer_stride == a["k_caches"][1].data_ptr() - a["k_caches"][0].data_ptr()
    assert launch.grid == -(-2 * 34 * 1 // (256 // 8))


class FakeDriver:
    """Records what the launcher hands to cuda.bindings.driver."""

    class CUstream(int):
        pass

    def __init__(self):
        self.loaded, self.looked_up, self.launches, self.ctx_set = [], [], [], 0
        self.current = 0

    def cuCtxGetCurrent(self):
        return 0, self.current

    def cuCtxSetCurrent(self, ctx):
        self.current, self.ctx_set = ctx, self.ctx_set + 1
        return (0,)

    def cuModuleLoadData(self, image):
        self.loaded.append(image)
        return 0, 1000 + len(self.loaded)

    def cuModuleGetFunction(self, module, name):
        self.looked_up.append((module, name.decode()))
        return 0, name.decode()

    def cuLaunchKernel(self, fn, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        ptrs = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        self.launches.append(dict(fn=fn, grid=(gx, gy, gz), block=(bx, by, bz), smem=smem,
                                  stream=int(stream), extra=extra, arg0=ptrs[0],
                                  ctx=self.current))
        self.launches[-1]["bytes"] = ctypes.string_at(ptrs[0], 4096)
        return (0,)


def _fake_device(arch, cache, monkeypatch):
    monkeypatch.setattr(_nvrtc, "cache_dir", lambda: cache)
    dev = _jit._Device.__new__(_jit._Device)
    dev.index, dev.arch, dev.num_sms, dev.ctx = 0, arch, 8, 77
    dev.modules, dev.functions, dev.lock = {}, {}, threading.Lock()
    return dev


@pytest.mark.parametrize("arch", ARCHS)
def test_cu_launch_kernel_gets_the_cpp_params(recorder, compiled, cache, monkeypatch, arch):
    """cuLaunchKernel through a recording driver: the cubin of the arch, the
    lowered name of the instantiation the C++ dispatch picks, its grid, block,
    dynamic smem, the stream, and as the one kernel argument the C++ params block."""
    fake = FakeDriver()
    monkeypatch.setattr(_jit, "driver", fake)
    dev = _fake_device(arch, cache, monkeypatch)
    args = _verify_case(dtype=torch.bfloat16)
    want = _run_cpp_verify(recorder, args, dev.num_sms)
    wa = _write_kv_case(layout="separate", L=34, N=2, H=1, cache=torch.float8_e4m3fn)
    want += _run_cpp_write_kv(recorder, wa)
    launches = _py_verify(args, dev.num_sms) + _py_write_kv(wa)
    _jit.launch(launches, dev, 0xABC)
    # The device's context for the launches, the thread's previous one restored after.
    assert [c["ctx"] for c in fake.launches] == [77] * 4
    assert fake.current == 0 and fake.ctx_set == 2
    assert len(fake.loaded) == 2  # one module per op, loaded once
    assert len(fake.launches) == len(want) == 4
    for op_want, rec in zip(want, fake.launches):
        kernel, grid, threads, smem, fields = op_want
        op = "verify_chain" if "verify" in kernel else "write_kv"
        assert rec["fn"] == compiled[(op, arch)].names[kernel]
        assert rec["grid"] == (grid, 1, 1) and rec["block"] == (threads, 1, 1)
        assert rec["smem"] == smem and rec["stream"] == 0xABC and rec["extra"] == 0
        struct = STRUCTS[op]
        assert _fields(struct.from_buffer_copy(rec["bytes"][:ctypes.sizeof(struct)])) == fields


def test_backend_functions_launch_what_the_cpp_host_path_launches(recorder, cache, monkeypatch):
    """_jit.verify_chain / write_kv end to end (their device and stream stood in
    for, CPU tensors): the C++ host path's launches, the workspace from torch."""
    fake = FakeDriver()
    monkeypatch.setattr(_jit, "driver", fake)
    dev = _fake_device("sm_90a", cache, monkeypatch)
    monkeypatch.setattr(_jit, "_target", lambda t, op: (dev, 0x5EED))
    args = _verify_case(dtype=torch.float16, tok=torch.int64, V=20000)
    want = _run_cpp_verify(recorder, args, dev.num_sms)
    _jit.verify_chain(*args.values())
    wa = _write_kv_case(act=torch.bfloat16, D=256, layout="separate")
    want += _run_cpp_write_kv(recorder, wa)
    _jit.write_kv(*wa.values())
    assert len(fake.launches) == len(want) == 3
    for (kernel, grid, threads, smem, fields), rec in zip(want, fake.launches):
        op = "verify_chain" if "verify" in kernel else "write_kv"
        struct = STRUCTS[op]
        got = _fields(struct.from_buffer_copy(rec["bytes"][:ctypes.sizeof(struct)]))
        if op == "verify_chain":  # the workspace: torch's, split as set_verify_chain_workspace
            parts = fields["batch"] * fields["block_size"] * fields["num_splits"]
            assert got["workspace_index"] - got["workspace_score"] == 4 * parts
            for f in ("workspace_score", "workspace_index"):
                got[f] = fields[f]
        assert got == fields
        assert (rec["grid"][0], rec["block"][0], rec["smem"], rec["stream"]) == (
            grid, threads, smem, 0x5EED)
        assert rec["fn"] == _nvrtc.compile_op(op, "sm_90a", cache).names[kernel]


# ---------------------------------------------------------------- the registry


@pytest.fixture
def reload_cuda(monkeypatch):
    """Re-imports dflash_kernels.cuda under patched conditions; restores everything after."""
    names = ["dflash_kernels.cuda", "dflash_kernels.cuda.verify_chain",
             "dflash_kernels.cuda.write_kv"]
    saved = {n: sys.modules.get(n) for n in names}
    if hasattr(dflash_kernels, "cuda"):
        monkeypatch.setattr(dflash_kernels, "cuda", dflash_kernels.cuda)
    if hasattr(dflash_kernels, "_C"):
        monkeypatch.setattr(dflash_kernels, "_C", dflash_kernels._C)

    def load(has_c, device, bindings=True, env=None):
        for n in names:
            sys.modules.pop(n, None)
        if not has_c:
            monkeypatch.delattr(dflash_kernels, "_C", raising=False)
            monkeypatch.setitem(sys.modules, "dflash_kernels._C", None)
        if not bindings:
            import cuda.bindings

            monkeypatch.delattr(cuda.bindings, "driver", raising=False)
            monkeypatch.setitem(sys.modules, "cuda.bindings.driver", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: device)
        if env is None:
            monkeypatch.delenv("DFLASH_KERNELS_CUDA_JIT", raising=False)
        else:
            monkeypatch.setenv("DFLASH_KERNELS_CUDA_JIT", env)
        monkeypatch.delenv(_registry.ENV_VAR, raising=False)
        _registry._load.cache_clear()
        _registry._resolve.cache_clear()
        try:
            return importlib.import_module("dflash_kernels.cuda")
        except ImportError as exc:
            return exc

    yield load
    for n, module in saved.items():
        if module is None:
            sys.modules.pop(n, None)
        else:
            sys.modules[n] = module
    _registry._load.cache_clear()
    _registry._resolve.cache_clear()


def test_registry_offers_nvrtc_when_the_extension_is_missing(reload_cuda):
    pkg = reload_cuda(has_c=False, device=True)
    assert not isinstance(pkg, Exception), pkg
    assert pkg.IMPL == "nvrtc"
    assert _registry.resolve("verify_chain", "cuda") == "cuda"
    assert _registry.resolve("write_kv", "cuda") == "cuda"
    assert _registry.backends("cuda")["verify_chain"][0] == "cuda"
    assert _registry.get("write_kv", "cuda").__module__ == "dflash_kernels.cuda.write_kv"
    assert sys.modules["dflash_kernels.cuda.write_kv"]._op is _jit.write_kv
    assert sys.modules["dflash_kernels.cuda.verify_chain"]._op is _jit.verify_chain
    # The refused arguments still go elsewhere.
    assert _registry.resolve("verify_chain", "cuda", given=("top_k",)) == "triton"


@pytest.mark.parametrize("device, bindings, why", [
    (False, True, "no CUDA device"),
    (True, False, "cuda.bindings is not importable"),
])
def test_registry_refuses_nvrtc_without_device_or_bindings(reload_cuda, device, bindings, why):
    err = reload_cuda(has_c=False, device=device, bindings=bindings)
    assert isinstance(err, ImportError) and why in str(err)
    assert "cuda" not in _registry.backends("cuda")["verify_chain"]
    assert _registry.resolve("verify_chain", "cuda") == "triton"
    with pytest.raises(_registry.BackendUnavailableError, match=why):
        _registry.resolve("write_kv", "cuda", backend="cuda")


def test_env_forces_nvrtc_over_the_extension(reload_cuda):
    try:
        from dflash_kernels import _C  # noqa: F401
    except ImportError:
        pytest.skip("dflash_kernels._C is not built")
    assert reload_cuda(has_c=True, device=True).IMPL == "extension"
    pkg = reload_cuda(has_c=True, device=True, env="1")
    assert pkg.IMPL == "nvrtc"
    assert _registry.resolve("verify_chain", "cuda") == "cuda"
    assert sys.modules["dflash_kernels.cuda.verify_chain"]._op is _jit.verify_chain
    err = reload_cuda(has_c=True, device=False, env="1")
    assert isinstance(err, ImportError) and "DFLASH_KERNELS_CUDA_JIT" in str(err)


# ---------------------------------------------------------------- GPU


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _others(op):
    """(name, backend function) of the extension (when built) and the reference."""
    out = [("reference", importlib.import_module(f"dflash_kernels.reference.{op}").__dict__[op])]
    try:
        from dflash_kernels import _C  # noqa: F401
        out.append(("extension", getattr(torch.ops.dflash, f"{op}_cuda").default))
    except ImportError:
        pass
    return out


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_verify_chain_jit_equals_extension(dtype):
    B, S, V = 5, 4, 9011
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(B, S, V, device="cuda", generator=g).to(dtype)
    args = dict(_verify_case(dtype=dtype, B=B, S=S, V=V))
    args = {k: (t.cuda() if isinstance(t, torch.Tensor) else t) for k, t in args.items()}
    args["logits"] = logits
    args["block_tokens"][:, 1:] = logits.argmax(-1)[:, :-1].to(args["block_tokens"].dtype)
    args["temperature"] = torch.tensor([0.0, 0.7, 1.0, 0.0, 2.0], device="cuda")
    outs = {}
    for name, fn in [("jit", _jit.verify_chain), *_others("verify_chain")]:
        o = {k: torch.full_like(args[k], -777) for k in ("accept_len", "out_tokens", "bonus",
                                                         "new_seq_lens")}
        fn(*{**args, **o}.values())
        outs[name] = o
    torch.cuda.synchronize()
    for name, o in outs.items():
        for k in o:
            assert torch.equal(o[k], outs["jit"][k]), (name, k)


@gpu
@pytest.mark.parametrize("cache", [torch.bfloat16, torch.float8_e4m3fn])
def test_gpu_write_kv_jit_equals_extension(cache):
    N, L, H, D, P, page = 7, 3, 2, 128, 6, 4
    g = torch.Generator(device="cuda").manual_seed(1)
    k = torch.randn(N, L, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(N, L, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    R = 64
    cs = torch.randn(50, R, device="cuda", generator=g)
    fp8 = cache == torch.float8_e4m3fn
    common = dict(k=k, v=v, k_norm_weight=torch.rand(L, D, device="cuda", generator=g) + 0.5,
                  positions=torch.randint(0, 50, (N,), device="cuda", generator=g),
                  slot_mapping=torch.tensor([0, 5, -1, 9, 23, 2, 17], device="cuda"),
                  cos_sin_cache=cs, eps=1e-6, rope_neox=True, rotary_dim=R,
                  k_scale=torch.tensor([0.5], device="cuda") if fp8 else None,
                  v_scale=torch.tensor([2.0], device="cuda") if fp8 else None)
    results = {}
    for name, fn in [("jit", _jit.write_kv), *_others("write_kv")]:
        kc = [torch.full((P, page, H, D), 3.0, device="cuda").to(cache) for _ in range(L)]
        vc = [torch.full((P, page, H, D), 3.0, device="cuda").to(cache) for _ in range(L)]
        a = dict(common, k_caches=kc, v_caches=vc)
        fn(a["k"], a["v"], a["k_norm_weight"], a["positions"], a["slot_mapping"], kc, vc,
           a["cos_sin_cache"], a["eps"], a["rope_neox"], a["rotary_dim"], a["k_scale"],
           a["v_scale"])
        results[name] = kc + vc
    torch.cuda.synchronize()
    bits = lambda c: c.view(torch.uint8) if fp8 else c.view(torch.int16)  # noqa: E731
    for name, caches in results.items():
        for got, jit in zip(caches, results["jit"]):
            if name == "extension":  # the same kernel source: bit for bit
                assert torch.equal(bits(got), bits(jit)), name
            else:  # the reference: within one fp8 / bf16 rounding step
                rtol = 0.13 if fp8 else 1e-2
                assert torch.allclose(got.float(), jit.float(), rtol=rtol, atol=1e-2), name
