"""The CUDA backend (csrc/) against the PyTorch reference.

Two runners share every case:
- ``gpu``: the public ops with ``backend="cuda"`` (skipped without a GPU and
  the built extension);
- ``emulated``: the same kernel source compiled by g++ with
  csrc/testing/host_emulation.h (a std::thread per CUDA thread, barriers for
  __syncthreads / __syncwarp, a mailbox for warp shuffles) on CPU tensors, so
  the indexing, reductions, noise and rounding of the kernels are checked on
  machines without a GPU. The emulator entry points run the bindings' own host
  path (csrc/verify_chain.h, csrc/write_kv.h: guards, strides, alignment
  choice, uniform layer stride, 32-layer pointer tables) and launch dispatch
  (csrc/*.cuh); the Python glue here only describes tensors.

Outputs are pre-filled with garbage, caches with random bits (NaN patterns
included), slots include negative entries, block tokens include ids outside
[0, V), and rows include NaN, all -inf, all NaN and tied logits.
"""

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import dflash_kernels
from helpers import (FP8_MAX, INT_VIEW, assert_kv_edge_rules, edge_verify_case, make_caches,
                     make_cos_sin, make_slots, sentinel_fill, snapshot)
from helpers import make_verify_case as make_case, pruning_rows, run_verify as run

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

try:
    from dflash_kernels import _C  # noqa: F401

    HAS_EXT = True
except ImportError:
    HAS_EXT = False
HAS_GPU = torch.cuda.is_available() and HAS_EXT

RUNNERS = [
    pytest.param("gpu", marks=pytest.mark.skipif(
        not HAS_GPU, reason="needs a CUDA GPU and the built extension dflash_kernels._C")),
    "emulated",
]

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2,  # csrc/tensor.h's DType
              torch.float8_e4m3fn: 3, torch.float8_e5m2: 4, torch.int32: 5, torch.int64: 6}
EMU_NUM_SMS = 8  # split plan of a small GPU: several splits per row at large V


# ---------------------------------------------------------------- host emulation

def _cuda_include():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and (Path(os.environ[var]) / "include" / "cuda_fp8.h").exists():
            return Path(os.environ[var]) / "include"
    nvcc = shutil.which("nvcc")
    cands = [Path(os.path.realpath(nvcc)).parent.parent] if nvcc else []
    cands.append(Path("/usr/local/cuda"))
    for c in cands:
        if (c / "include" / "cuda_fp8.h").exists():
            return c / "include"
    return None


def _build_emu(tmp_path_factory, *defines):
    cxx = shutil.which("g++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip("host emulation needs g++ and the CUDA toolkit headers (cuda_fp8.h)")
    so = tmp_path_factory.mktemp("emu") / "dflash_emulate.so"
    res = subprocess.run([cxx, "-std=c++20", "-O2", "-fno-strict-aliasing", "-fPIC", "-shared",
                          "-Wall", "-Werror", *defines,
                          f"-I{inc}", f"-I{CSRC}", str(CSRC / "testing" / "emulate.cpp"),
                          "-o", str(so), "-lpthread"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lib = ctypes.CDLL(str(so))
    lib.emu_verify_chain.restype = ctypes.c_char_p
    lib.emu_verify_chain.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.emu_write_kv.restype = ctypes.c_char_p
    lib.emu_write_kv.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int,
                                 ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    lib.emu_misaligned_vector_accesses.restype = ctypes.c_int64
    lib.emu_misaligned_vector_accesses.argtypes = []
    return lib


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return _build_emu(tmp_path_factory)


@pytest.fixture(scope="module")
def emu_unpruned(tmp_path_factory):
    """The split-argmax without the exact pruning of sampled rows (every element's noise)."""
    return _build_emu(tmp_path_factory, "-DDFLASH_VERIFY_PRUNE=0")


class _NoMisalignedVectorAccess:
    """Asserts that a block of emulated launches made no vector load / store at
    an address that is not a multiple of its width (a fault on the GPU)."""

    def __init__(self, lib):
        self.lib = lib

    def __enter__(self):
        self.before = self.lib.emu_misaligned_vector_accesses()

    def __exit__(self, *exc):
        bad = self.lib.emu_misaligned_vector_accesses() - self.before
        assert bad == 0, f"{bad} misaligned vector accesses: the vector path took unaligned data"


DESC_WORDS = 13  # emulate.cpp's kDescWords


def _desc(t):
    """A tensor as emulate.cpp's words: data, defined, dtype, device, ndim, 4 sizes, 4 strides."""
    if t is None:
        return [0] * DESC_WORDS
    pad = lambda xs: list(xs)[:4] + [0] * (4 - min(len(xs), 4))
    return [t.data_ptr(), 1, DTYPE_CODE.get(t.dtype, -1), 0, t.dim(), *pad(t.shape),
            *pad(t.stride())]


def _descs(tensors):
    return torch.tensor([w for t in tensors for w in _desc(t)], dtype=torch.int64)


def emu_verify_chain(lib, kw, out):
    """dflash::verify_chain_cuda on the emulated kernels: the bindings' host path
    (csrc/verify_chain.h) and the launch dispatch (csrc/verify_chain.cuh) in C++.

    kw: make_case's inputs; out: the 4 outputs. Returns (split count, whether
    the vector path was chosen).
    """
    args = [kw["logits"], kw["block_tokens"], kw["num_drafts"],
            *(kw.get(n) for n in ("temperature", "top_k", "top_p", "seeds", "positions",
                                  "draft_probs", "seq_lens")), *out]
    descs, info = _descs(args), torch.zeros(2, dtype=torch.int64)
    with _NoMisalignedVectorAccess(lib):
        err = lib.emu_verify_chain(descs.data_ptr(), EMU_NUM_SMS, info.data_ptr())
    assert err is None, err.decode()
    return int(info[0]), bool(info[1])


def emu_write_kv(lib, k, v, k_norm_weight, positions, slot_mapping, k_caches, v_caches,
                 cos_sin_cache, eps, rope_neox, rotary_dim, k_scale, v_scale):
    """dflash::write_kv_cuda on the emulated kernel: the bindings' host path
    (csrc/write_kv.h: uniform layer stride, 32-layer pointer tables) and the
    launch dispatch (csrc/write_kv.cuh) in C++.

    Returns, per launch, whether the vector path was chosen.
    """
    descs = _descs([k, v, k_norm_weight, positions, slot_mapping, cos_sin_cache, k_scale,
                    v_scale, *k_caches, *v_caches])
    info = torch.zeros(8, dtype=torch.int64)
    with _NoMisalignedVectorAccess(lib):
        err = lib.emu_write_kv(descs.data_ptr(), len(k_caches), eps, rope_neox, rotary_dim,
                               info.data_ptr(), len(info))
    assert err is None, err.decode()
    return [bool(x) for x in info[1:1 + info[0]]]


# ---------------------------------------------------------------- verify_chain

def _garbage_out(B, S, with_seq):
    return (torch.full((B,), -777, dtype=torch.int32), torch.full((B, S), -777, dtype=torch.int32),
            torch.full((B,), -777, dtype=torch.int32),
            torch.full((B,), -777, dtype=torch.int32) if with_seq else None)


def run_cuda_verify(runner, request, kw):
    """(accept_len, out_tokens, bonus, new_seq_lens) from the CUDA kernels."""
    if runner == "gpu":
        return tuple(run("cuda", {k: v.cuda() for k, v in kw.items()}))
    lib = request.getfixturevalue("emu")
    B, S = kw["block_tokens"].shape
    out = _garbage_out(B, S, "seq_lens" in kw)
    emu_verify_chain(lib, kw, out)
    return out


def assert_verify_equal(got, kw):
    want = run("reference", kw)
    names = ("accept_len", "out_tokens", "bonus", "new_seq_lens")
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None
            continue
        assert torch.equal(g.cpu(), w.cpu()), f"{name}: got {g.tolist()}, want {w.tolist()}"


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("B, S, V, dtype, sampled, tokens64", [
    (3, 5, 1000, torch.float32, "none", False),
    (4, 4, 1000, torch.float16, "all", True),
    (5, 3, 1000, torch.bfloat16, "mixed", False),
    (2, 4, 9000, torch.float16, "mixed", True),       # 2 vocabulary splits per row
    (3, 4, 151936, torch.bfloat16, "mixed", False),   # Qwen vocabulary, many splits
    (2, 1, 1000, torch.float32, "all", False),         # anchor only: no drafts
])
def test_verify_chain_matches_reference(runner, request, B, S, V, dtype, sampled, tokens64):
    kw = make_case(B, S, V, dtype=dtype, sampled=sampled, special_rows=True, gen_seed=V + B)
    if tokens64:
        kw["block_tokens"] = kw["block_tokens"].to(torch.int64)
    else:
        kw["block_tokens"] = kw["block_tokens"].to(torch.int32)
    assert_verify_equal(run_cuda_verify(runner, request, kw), kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_chain_pruned_equals_unpruned(request, dtype):
    """Exact pruning of sampled rows (cannot_win): the pruned and unpruned split-argmax give
    the same tokens on flat, peaked, NaN / -inf and bound-graded rows, and so does the reference."""
    V = 4 * 1024 + 3
    x = pruning_rows(V, 1024, gen_seed=5).to(dtype)
    B = x.shape[0]
    g = torch.Generator().manual_seed(2)
    kw = dict(logits=x[:, None, :], block_tokens=torch.zeros(B, 1, dtype=torch.int32),
              num_drafts=torch.zeros(B, dtype=torch.int32), temperature=torch.ones(B),
              seeds=torch.randint(-2 ** 62, 2 ** 62, (B,), generator=g),
              positions=torch.randint(0, 2 ** 34, (B,), generator=g))
    got = []
    for lib in (request.getfixturevalue("emu"), request.getfixturevalue("emu_unpruned")):
        out = _garbage_out(B, 1, False)
        emu_verify_chain(lib, kw, out)
        got.append(out)
    assert torch.equal(got[0][2], got[1][2]), (got[0][2].tolist(), got[1][2].tolist())
    assert got[0][2][1] == 3 and got[0][2][2] == V - 1 and got[0][2][3] == 100
    assert_verify_equal(got[0], kw)


def _logits_layout(logits, layout):
    """A copy of ``logits`` [B, S, V] whose base pointer or row strides are (mis)aligned.

    aligned: rows on 16 bytes; base: the base 1 element past 16 bytes; row_stride:
    aligned base, row stride (V + 1 elements) off 16 bytes; batch_stride: aligned
    base and row stride, batch stride off 16 bytes. NaN fills the gaps.
    """
    B, S, V = logits.shape
    Vp = (V + 7) // 8 * 8  # 32-byte rows for fp32 and fp16
    row = {"aligned": Vp, "base": Vp, "row_stride": Vp + 1, "batch_stride": Vp}[layout]
    batch = S * row + (1 if layout == "batch_stride" else 0)
    offset = 1 if layout == "base" else 0
    buf = torch.full((B * batch + offset + 8,), float("nan"), dtype=logits.dtype,
                     device=logits.device)
    out = buf.as_strided((B, S, V), (batch, row, 1), offset)
    out.copy_(logits)
    return out


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("layout", ["aligned", "base", "row_stride", "batch_stride"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_verify_chain_unaligned_and_strided_logits(runner, request, dtype, layout):
    """Rows that do not start on 16 bytes (base pointer or either stride) take the
    scalar path with the same answers; the emulator counts misaligned vector loads."""
    B, S, V = 3, 4, 2053
    kw = make_case(B, S, V, dtype=dtype, sampled="mixed", special_rows=True, gen_seed=5)
    if runner == "gpu":
        # Built on the device: .cuda() of a view with gaps would make it contiguous.
        kwg = {k: v.cuda() for k, v in kw.items()}
        kwg["logits"] = _logits_layout(kwg["logits"], layout)
        got = tuple(run("cuda", kwg))
    else:
        kw["logits"] = _logits_layout(kw["logits"], layout)
        out = _garbage_out(B, S, "seq_lens" in kw)
        _, vectorized = emu_verify_chain(request.getfixturevalue("emu"), kw, out)
        assert vectorized == (layout == "aligned")
        got = out
    assert_verify_equal(got, kw)


@pytest.mark.parametrize("runner", RUNNERS)
def test_verify_chain_full_acceptance_and_ties(runner, request):
    """Drafts equal to the targets are all accepted; tied maxima give the lowest id."""
    B, S, V = 2, 6, 300
    logits = torch.full((B, S, V), -3.0)
    logits[0, :, 7] = 2.0
    logits[0, :, 250] = 2.0        # tie: 7 wins
    logits[1, torch.arange(S), torch.arange(S) + 10] = 1.0
    bt = torch.tensor([[1, 7, 7, 7, 7, 7], [1, 10, 11, 12, 13, 14]], dtype=torch.int32)
    kw = dict(logits=logits, block_tokens=bt, num_drafts=torch.full((B,), S - 1, dtype=torch.int32),
              seq_lens=torch.tensor([4, 9], dtype=torch.int32))
    got = run_cuda_verify(runner, request, kw)
    assert got[0].tolist() == [5, 5]
    assert got[1].tolist() == [[7, 7, 7, 7, 7, 7], [10, 11, 12, 13, 14, 15]]
    assert got[3].tolist() == [10, 15]
    assert_verify_equal(got, kw)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and the built extension")
@pytest.mark.parametrize("options", [dict(top_k=True), dict(top_p=True), dict(draft_probs=True)])
def test_verify_chain_filtered_calls_run_elsewhere(options):
    """top-k / top-p / draft_probs calls on CUDA tensors: the cuda backend declares
    them unsupported (UNSUPPORTED_ARGS), so the registry runs another backend."""
    kw = make_case(3, 4, 1000, dtype=torch.float16, sampled="mixed", gen_seed=3, **options)
    got = run(None, {k: v.cuda() for k, v in kw.items()})
    assert_verify_equal(tuple(got), {k: v.cuda() for k, v in kw.items()})


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and the built extension")
def test_verify_chain_cuda_flat_logits_and_graph_capture():
    """[B*S, V] logits, and a CUDA-graph replay with new inputs (no host sync inside)."""
    kw = {k: v.cuda() for k, v in make_case(4, 4, 5000, dtype=torch.bfloat16, sampled="mixed",
                                             gen_seed=11).items()}
    flat = dict(kw, logits=kw["logits"].reshape(16, 5000))
    assert_verify_equal(tuple(run("cuda", flat)), kw)
    static = {k: v.clone() for k, v in kw.items()}
    out = tuple(t.cuda() if t is not None else None for t in _garbage_out(4, 4, True))
    args = {k: v for k, v in static.items() if k not in ("logits", "block_tokens")}
    dflash_kernels.verify_chain(static["logits"], static["block_tokens"], out=out,
                                backend="cuda", **args)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dflash_kernels.verify_chain(static["logits"], static["block_tokens"], out=out,
                                    backend="cuda", **args)
    new = {k: v.cuda() for k, v in make_case(4, 4, 5000, dtype=torch.bfloat16, sampled="mixed",
                                              gen_seed=12).items()}
    for key in static:
        static[key].copy_(new[key])
    graph.replay()
    assert_verify_equal(out, new)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and the built extension")
def test_verify_chain_cuda_strided_and_expanded_vectors():
    """Per-request vectors that are strided views (a column of a [B, 2] state) or
    expanded (one temperature for the batch, stride 0): the kernels index them as
    p[b], so the public op passes dense copies (the binding's guards reject others)."""
    B, S, V = 5, 4, 3000
    kw = {k: v.cuda() for k, v in make_case(B, S, V, dtype=torch.float16, sampled="all",
                                             gen_seed=21).items()}
    col = lambda x: torch.stack([x, torch.full_like(x, -9)], 1)[:, 0]  # stride 2
    strided = dict(kw, num_drafts=col(kw["num_drafts"]), seeds=col(kw["seeds"]),
                   positions=col(kw["positions"]), seq_lens=col(kw["seq_lens"]),
                   temperature=torch.full((1,), 0.7, device="cuda").expand(B))
    assert strided["temperature"].stride() == (0,) and strided["seeds"].stride() == (2,)
    want = dict(strided, temperature=strided["temperature"].contiguous())
    assert_verify_equal(tuple(run("cuda", strided)), want)


# ---------------------------------------------------------------- write_kv

def _clone_layout(k, v):
    def clone(x):
        if isinstance(x, torch.Tensor):
            return x.clone(memory_format=torch.preserve_format)
        return [c.clone() for c in x]
    k2, v2 = clone(k), clone(v)
    as_list = lambda x: list(x.unbind(0)) if isinstance(x, torch.Tensor) else x
    return k2, v2, as_list(k2), as_list(v2)


def assert_same_writes(got, want, before, slots, page, act):
    """Rows at valid slots close to the reference; every other row bit-identical to before."""
    valid = slots[slots >= 0].cpu()
    for layer, (g, w, b) in enumerate(zip(got, want, before)):
        g, w, b = g.cpu(), w.cpu(), b.cpu()
        written = torch.zeros(g.shape[:2], dtype=torch.bool)
        written[valid // page, valid % page] = True
        iv = INT_VIEW[g.element_size()]
        assert torch.equal(g.view(iv)[~written], b.view(iv)[~written]), f"layer {layer}: stray writes"
        gw, ww = g[written].float(), w[written].float()
        if g.dtype in FP8_MAX:
            # rsqrt and the fp32 op order may move a value across an fp8 rounding boundary.
            rtol, atol = (2 ** -3, 2 ** -8) if g.dtype == torch.float8_e4m3fn else (2 ** -2, 2 ** -15)
            exact = (g[written].view(torch.uint8) == w[written].view(torch.uint8)).float().mean()
            assert exact > 0.97, f"layer {layer}: only {exact:.3f} of fp8 values bit-equal"
        else:
            rtol, atol = (2e-3, 2e-3) if act == torch.float16 else (1.6e-2, 1.6e-2)
        torch.testing.assert_close(gw, ww, rtol=rtol, atol=atol, msg=lambda m: f"layer {layer}: {m}")


WRITE_KV_CASES = [
    # L, N, page, D, layout, neox, rotary_dim, knorm, act, cache dtype, misaligned
    (1, 5, 16, 64, "stacked", True, None, True, torch.float16, torch.float16, False),
    (3, 7, 1, 128, "separate", False, None, True, torch.bfloat16, torch.bfloat16, False),
    (2, 9, 4, 256, "stacked_hnd", True, 64, False, torch.float16, torch.float8_e4m3fn, False),
    (2, 6, 16, 128, "combined", False, 96, True, torch.bfloat16, torch.float8_e5m2, False),
    (4, 5, 8, 64, "views", True, 32, True, torch.float16, torch.float16, True),
    (34, 3, 4, 64, "separate", False, 16, True, torch.float16, torch.float8_e4m3fn, False),
]


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize(
    "L, N, page, D, layout, neox, rotary_dim, knorm, act, cache_dtype, misaligned", WRITE_KV_CASES)
def test_write_kv_matches_reference(runner, request, L, N, page, D, layout, neox, rotary_dim,
                                    knorm, act, cache_dtype, misaligned):
    device = "cuda" if runner == "gpu" else "cpu"
    Hkv, P, max_pos = 2, N // page + 3, 97
    # Strided k / v: views of a fused [N, L, 2, Hkv, D] projection output.
    numel = N * L * 2 * Hkv * D
    flat = torch.randn(numel + 1, device=device).to(act)
    kv = (flat[1:] if misaligned else flat[:numel]).view(N, L, 2, Hkv, D)
    k, v = kv[:, :, 0], kv[:, :, 1]
    knw = (1 + 0.2 * torch.randn(L, D, device=device)).to(act) if knorm else None
    positions = torch.randint(0, max_pos, (N,), device=device)
    slots = make_slots(N, P * page, max(N // 3, 1), device)
    positions[slots < 0] = -(10 ** 9)  # never read
    rd = rotary_dim or D
    cos_sin = make_cos_sin(max_pos, rd, device)
    fp8 = cache_dtype in FP8_MAX
    scales = dict(k_scale=0.05, v_scale=torch.tensor([0.04], device=device)) if fp8 else {}

    kc, vc, k_list, v_list = make_caches(layout, L, P, page, Hkv, D, cache_dtype, device)
    kc_ref, vc_ref, k_ref_list, v_ref_list = _clone_layout(kc, vc)
    k_before, v_before = snapshot(k_list), snapshot(v_list)
    dflash_kernels.write_kv(k, v, knw, positions, slots, kc_ref, vc_ref, cos_sin,
                            rope_style="neox" if neox else "gptj", rotary_dim=rotary_dim,
                            backend="reference", **scales)
    if runner == "gpu":
        dflash_kernels.write_kv(k, v, knw, positions, slots, kc, vc, cos_sin,
                                rope_style="neox" if neox else "gptj", rotary_dim=rotary_dim,
                                backend="cuda", **scales)
    else:
        ks = torch.full((1,), 0.05) if fp8 else None
        vs = scales.get("v_scale")
        launches = emu_write_kv(request.getfixturevalue("emu"), k, v, knw, positions, slots,
                                k_list, v_list, cos_sin, 1e-6, neox, rd, ks, vs)
        # One launch for caches at a uniform layer distance, else one per 32 layers.
        assert len(launches) == (-(-L // 32) if layout == "separate" else 1)
    assert_same_writes(k_list, k_ref_list, k_before, slots, page, act)
    assert_same_writes(v_list, v_ref_list, v_before, slots, page, act)


def _strided_caches(layout, L, P, page, Hkv, D, dtype, device):
    """L per-layer cache views of one buffer of random bits at a uniform layer
    distance; cache_base, cache_head_stride and layer_stride put the base
    pointer, the head stride (D + 4) or the layer distance off an 8-element row."""
    Dh = D + 4 if layout == "cache_head_stride" else D
    strides = (page * Hkv * Dh, Hkv * Dh, Dh, 1)
    layer = P * page * Hkv * Dh + (4 if layout == "layer_stride" else 0)
    offset = 4 if layout == "cache_base" else 0
    buf = sentinel_fill(torch.empty(offset + L * layer, dtype=dtype, device=device))
    return [buf.as_strided((P, page, Hkv, D), strides, offset + i * layer) for i in range(L)]


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("layout", ["aligned", "k_base", "k_head_stride", "cache_base",
                                    "cache_head_stride", "layer_stride"])
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float8_e4m3fn])
def test_write_kv_unaligned_layouts(runner, request, layout, cache_dtype):
    """Any misaligned base pointer, stride or layer distance takes the scalar path
    (the emulator counts misaligned vector accesses) with the reference's writes."""
    device = "cuda" if runner == "gpu" else "cpu"
    N, L, Hkv, D, page, P, max_pos = 6, 3, 2, 64, 4, 4, 50
    Dk = D + 4 if layout == "k_head_stride" else D
    off = 1 if layout == "k_base" else 0
    flat = torch.randn(off + N * L * 2 * Hkv * Dk, device=device).half()
    kv = flat[off:].view(N, L, 2, Hkv, Dk)[..., :D]
    k, v = kv[:, :, 0], kv[:, :, 1]
    knw = (1 + 0.2 * torch.randn(L, D, device=device)).half()
    positions = torch.randint(0, max_pos, (N,), device=device)
    slots = make_slots(N, P * page, 2, device)
    cos_sin = make_cos_sin(max_pos, D, device)
    fp8 = cache_dtype in FP8_MAX
    k_list = _strided_caches(layout, L, P, page, Hkv, D, cache_dtype, device)
    v_list = _strided_caches(layout, L, P, page, Hkv, D, cache_dtype, device)
    k_ref, v_ref = snapshot(k_list), snapshot(v_list)
    k_before, v_before = snapshot(k_list), snapshot(v_list)
    scales = dict(k_scale=0.05, v_scale=0.04) if fp8 else {}
    dflash_kernels.write_kv(k, v, knw, positions, slots, k_ref, v_ref, cos_sin,
                            backend="reference", **scales)
    if runner == "gpu":
        dflash_kernels.write_kv(k, v, knw, positions, slots, k_list, v_list, cos_sin,
                                backend="cuda", **scales)
    else:
        one = (lambda x: torch.full((1,), x)) if fp8 else (lambda x: None)
        chosen = emu_write_kv(request.getfixturevalue("emu"), k, v, knw, positions, slots,
                              k_list, v_list, cos_sin, 1e-6, True, D, one(0.05), one(0.04))
        assert chosen == [layout == "aligned"]
    assert_same_writes(k_list, k_ref, k_before, slots, page, torch.float16)
    assert_same_writes(v_list, v_ref, v_before, slots, page, torch.float16)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and the built extension")
def test_write_kv_cuda_strided_positions_and_slots():
    """positions / slot_mapping as strided views (every other row of a [2N] tensor):
    the kernel reads them as p[t], so the public op passes dense copies."""
    N, L, Hkv, D, page, P, max_pos = 7, 2, 2, 128, 4, 5, 40
    k = torch.randn(N, L, Hkv, D, device="cuda").half()
    v = torch.randn(N, L, Hkv, D, device="cuda").half()
    pos = torch.randint(0, max_pos, (2 * N,), device="cuda")[::2]
    slots = torch.stack([make_slots(N, P * page, 2, "cuda"), torch.full((N,), -1, device="cuda")],
                        1).reshape(-1)[::2]
    assert pos.stride() == (2,) and slots.stride() == (2,)
    cos_sin = make_cos_sin(max_pos, D, "cuda")
    kc = sentinel_fill(torch.empty(L, P, page, Hkv, D, device="cuda").half())
    vc = sentinel_fill(torch.empty_like(kc))
    k_list, v_list = list(kc.unbind(0)), list(vc.unbind(0))
    k_ref, v_ref = snapshot(k_list), snapshot(v_list)
    k_before, v_before = snapshot(k_list), snapshot(v_list)
    dflash_kernels.write_kv(k, v, None, pos.contiguous(), slots.contiguous(), k_ref, v_ref,
                            cos_sin, backend="reference")
    dflash_kernels.write_kv(k, v, None, pos, slots, kc, vc, cos_sin, backend="cuda")
    assert_same_writes(k_list, k_ref, k_before, slots, page, torch.float16)
    assert_same_writes(v_list, v_ref, v_before, slots, page, torch.float16)


@pytest.mark.parametrize("runner", RUNNERS)
def test_write_kv_fp8_saturates(runner, request):
    """Values past the fp8 range store the largest finite value, with their sign."""
    device = "cuda" if runner == "gpu" else "cpu"
    N, L, Hkv, D, page = 2, 1, 1, 64, 4
    # 60000 / 0.5 and 60000 / 1 are past both formats' largest finite values.
    k = torch.full((N, L, Hkv, D), 60000.0, device=device).half()
    k[:, :, :, 1::2] = -60000.0
    v = k.clone()
    slots = torch.tensor([1, -1], device=device)
    positions = torch.zeros(N, dtype=torch.int64, device=device)
    cos_sin = torch.cat([torch.ones(1, D // 2), torch.zeros(1, D // 2)], 1).to(device)
    for dt, m in FP8_MAX.items():
        kc = torch.zeros(L, 2, page, Hkv, D, device=device).to(dt)
        vc = torch.zeros_like(kc)
        if runner == "gpu":
            dflash_kernels.write_kv(k, v, None, positions, slots, kc, vc, cos_sin, k_scale=0.5,
                                    v_scale=1.0, backend="cuda")
        else:
            one = lambda s: torch.full((1,), s)
            emu_write_kv(request.getfixturevalue("emu"), k, v, None, positions, slots,
                         list(kc.unbind(0)), list(vc.unbind(0)), cos_sin, 1e-6, True, D,
                         one(0.5), one(1.0))
        want = torch.full((D,), m)
        want[1::2] = -m
        assert torch.equal(kc[0, 0, 1, 0].float().cpu(), want)
        assert torch.equal(vc[0, 0, 1, 0].float().cpu(), want)
        assert kc.float().abs().sum().item() == D * m  # nothing else written


# ---------------------------------------------------------------- edge values (docs/DESIGN.md)

@pytest.mark.parametrize("runner", RUNNERS)
def test_verify_chain_edge_values(runner, request):
    # Temperatures +inf / 1e-40 / around SAMPLING_EPS / NaN, +inf logits, scaled overflow.
    kw = edge_verify_case()
    got = run_cuda_verify(runner, request, kw)
    assert_verify_equal(got, kw)
    assert got[2][1] == 2 and got[2][6] == got[2][7] == got[2][8] == 3


@pytest.mark.parametrize("runner", RUNNERS)
def test_write_kv_edge_slots_and_positions(runner, request):
    # Slots outside the cache skipped, positions clamped, the last of duplicate slots
    # wins (before: the emulated kernel mixed the rows of two writers).
    device = "cuda" if runner == "gpu" else "cpu"
    k, v = torch.randn(2, 12, 2, 2, 64, device=device).to(torch.float16)
    cos_sin = make_cos_sin(40, 64, device)

    def write(slots, pos, kc, vc):
        if runner == "gpu":
            dflash_kernels.write_kv(k, v, None, pos, slots, kc, vc, cos_sin, backend="cuda")
        else:
            emu_write_kv(request.getfixturevalue("emu"), k, v, None, pos, slots, list(kc),
                         list(vc), cos_sin, 1e-6, True, 64, None, None)

    for _ in range(3):  # the emulator's thread interleaving varies from run to run
        assert_kv_edge_rules(write, device)
