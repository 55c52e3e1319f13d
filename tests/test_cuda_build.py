"""The compiled extension (no GPU needed): it imports, registers its ops with
mutation-annotated schemas, the registry lists it, the bindings' host path
(through the CPU probe ops) guards direct calls, the binary holds SASS for
every target it was built for (sm_90a and sm_100a by default), and no kernel
uses local memory (spills) or a stack frame."""

import importlib
import inspect
import re
import subprocess
from pathlib import Path

import pytest
import torch

import dflash_kernels
from dflash_kernels import _registry

try:
    from dflash_kernels import _C
except ImportError as exc:  # pragma: no cover - depends on the install
    pytest.skip(f"dflash_kernels._C is not built ({exc}); build it with nvcc on PATH: "
                "pip install -e . --no-build-isolation", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SO = Path(_C.__file__)
DEFAULT_TARGETS = {"90a", "100a"}
KERNEL_FILES = ("verify_chain", "write_kv")


def _cuobjdump(*args):
    import triton

    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not exe.exists():
        pytest.skip(f"triton's bundled cuobjdump is missing ({exe})")
    return subprocess.run([str(exe), *args, str(SO)], capture_output=True, text=True,
                          check=True).stdout


def _targets():
    return set(filter(None, _C.sm_targets.split("_")))


@pytest.mark.parametrize(
    "op, mutated",
    [
        ("verify_chain", ["accept_len", "out_tokens", "bonus", "new_seq_lens"]),
        ("write_kv", ["k_caches", "v_caches"]),
    ],
)
def test_op_registered_with_mutation_schema(op, mutated):
    schema = getattr(torch.ops.dflash, f"{op}_cuda").default._schema
    written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written == mutated
    assert len(schema.returns) == 0
    # The backend functions' arguments (docs/DESIGN.md), the CUDA one included, less
    # those the binding never receives: verify_chain's ragged layout and filter
    # order, which the cuda backend declares unsupported (the registry routes
    # such calls elsewhere) and its wrapper drops.
    names = [a.name for a in schema.arguments]
    module = importlib.import_module(f"dflash_kernels.cuda.{op}")
    not_bound = {"verify_chain": {"cu_rows", "filter_order"}}.get(op, set())
    assert not_bound <= module.UNSUPPORTED_ARGS
    for fn in (_registry.get(op, "reference"), getattr(module, op)):
        params = [p for p in inspect.signature(fn).parameters if p not in not_bound]
        assert names == params, fn
    # The probe op: the same schema, for measurement.
    probe = getattr(torch.ops.dflash, f"_probe_{op}_cuda").default._schema
    assert str(probe).replace(f"_probe_{op}_cuda", f"{op}_cuda") == str(schema)


def test_cuda_backend_declares_unsupported_args():
    """The registry reads UNSUPPORTED_ARGS to send calls that pass them elsewhere."""
    for op, unsupported in (("verify_chain", {"top_k", "top_p", "draft_probs", "cu_rows", "filter_order"}),
                            ("write_kv", set())):
        module = importlib.import_module(f"dflash_kernels.cuda.{op}")
        assert module.UNSUPPORTED_ARGS == unsupported
        assert unsupported <= set(inspect.signature(getattr(module, op)).parameters)


def test_registry_lists_cuda_first_for_cuda_tensors_only():
    on_cuda = dflash_kernels.backends("cuda")
    for op in ("verify_chain", "write_kv"):
        assert on_cuda[op][0] == "cuda", on_cuda
        assert _registry.resolve(op, "cuda") == "cuda"
    for op in ("block_attention", "fuse_target_features", "inject_kv"):
        assert "cuda" not in on_cuda[op]
    assert all("cuda" not in b for b in dflash_kernels.backends("cpu").values())


def test_cpu_tensors_are_not_dispatched_to_cuda_kernels():
    x = torch.zeros(1, 2, 8)
    t = torch.zeros(1, 2, dtype=torch.int32)
    nd = torch.ones(1, dtype=torch.int32)
    outs = [torch.zeros(1, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32)]
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.dflash.verify_chain_cuda(x, t, nd, None, None, None, None, None, None, None,
                                           *outs, None)


# ------------------------------------- the bindings' host path, through the probe ops

def _verify_args(B=3, S=4, V=50, **change):
    """The 14 arguments of verify_chain_cuda (schema order) on CPU, outputs garbage-filled."""
    i32, i64 = torch.int32, torch.int64
    args = dict(logits=torch.randn(B, S, V), block_tokens=torch.zeros(B, S, dtype=i32),
                num_drafts=torch.full((B,), S - 1, dtype=i32), temperature=torch.full((B,), 0.5),
                top_k=None, top_p=None, seeds=torch.zeros(B, dtype=i64),
                positions=torch.zeros(B, dtype=i64), draft_probs=None,
                seq_lens=torch.zeros(B, dtype=i32), accept_len=torch.full((B,), -7, dtype=i32),
                out_tokens=torch.full((B, S), -7, dtype=i32), bonus=torch.full((B,), -7, dtype=i32),
                new_seq_lens=torch.full((B,), -7, dtype=i32))
    args.update(change)
    return list(args.values())


def _write_kv_args(N=5, L=3, H=2, D=64, P=4, page=4, **change):
    """The 13 arguments of write_kv_cuda (schema order) on CPU, caches zero-filled."""
    kc, vc = torch.zeros(L, P, page, H, D).half(), torch.zeros(L, P, page, H, D).half()
    args = dict(k=torch.randn(N, L, H, D).half(), v=torch.randn(N, L, H, D).half(),
                k_norm_weight=torch.ones(L, D), positions=torch.arange(N),
                slot_mapping=torch.arange(N), k_caches=list(kc.unbind(0)),
                v_caches=list(vc.unbind(0)), cos_sin_cache=torch.randn(9, D), eps=1e-6,
                rope_neox=True, rotary_dim=D, k_scale=None, v_scale=None)
    args.update(change)
    return list(args.values())


# The bindings through the dispatcher (torch.ops.dflash) and without it
# (dflash_kernels._C, csrc/bindings/direct.cpp: what the cuda backend calls).
PROBES = {"dispatcher": lambda op: getattr(torch.ops.dflash, f"_probe_{op}_cuda"),
          "direct": lambda op: getattr(_C, f"_probe_{op}_cuda")}


@pytest.mark.parametrize("via", sorted(PROBES))
def test_probe_ops_run_the_host_path_without_launching(via):
    """The measurement-only probes accept what the real ops accept and write nothing."""
    probe = PROBES[via]
    args = _verify_args()
    assert probe("verify_chain")(*args) is None
    assert all((t == -7).all() for t in args[10:])
    args = _write_kv_args()
    probe("write_kv")(*args)
    assert all(not c.any() for c in args[5] + args[6])
    # A layer list at no uniform distance: 34 layers go as two pointer-table launches.
    caches = [torch.zeros(4, 4, 2, 64).half() for _ in range(34)]
    probe("write_kv")(*_write_kv_args(L=34, k_norm_weight=None, k_caches=caches, v_caches=caches))
    # A list of one stacked [L, P, page, Hkv, D] cache is its L layers.
    stacked = torch.zeros(3, 4, 4, 2, 64).half()
    probe("write_kv")(*_write_kv_args(k_caches=[stacked], v_caches=[stacked.clone()]))
    with pytest.raises(RuntimeError, match="k_caches, v_caches: expected L per-layer caches"):
        probe("write_kv")(*_write_kv_args(k_caches=[stacked[:2]], v_caches=[stacked[:2]]))


def test_direct_bindings_refuse_wrong_argument_types():
    args = _verify_args()
    with pytest.raises(TypeError, match="expected 14 arguments"):
        _C._probe_verify_chain_cuda(*args[:13])
    with pytest.raises(TypeError, match="logits: expected a Tensor"):
        _C._probe_verify_chain_cuda(None, *args[1:])
    args = _write_kv_args()
    with pytest.raises(TypeError, match="k_caches: expected a list"):
        _C._probe_write_kv_cuda(*args[:5], args[5][0], *args[6:])
    with pytest.raises(TypeError, match="eps, rope_neox, rotary_dim"):
        _C._probe_write_kv_cuda(*args[:8], 1, *args[9:])


_STRIDED_I32 = torch.zeros(3, 2, dtype=torch.int32)[:, 0]  # a column: stride 2


@pytest.mark.parametrize("change, message", [
    (dict(num_drafts=_STRIDED_I32), "num_drafts: expected a contiguous int32"),
    (dict(top_k=torch.zeros(3, dtype=torch.int32)), "top_k, top_p, draft_probs"),
    (dict(logits=torch.randn(12, 50)), "logits: expected \\[B, S, V\\]"),
    (dict(logits=torch.randn(3, 4, 50).half().transpose(0, 2).contiguous().transpose(0, 2)),
     "logits: expected 1 <= V < 2\\^31 and a unit last stride"),
    (dict(logits=torch.randn(3, 4, 50).double()), "logits: expected fp32, fp16 or bf16"),
    (dict(out_tokens=torch.zeros(3, 3, dtype=torch.int32)), "accept_len, out_tokens, bonus"),
    (dict(seeds=None), "seeds, positions"),
    (dict(new_seq_lens=None), "seq_lens, new_seq_lens: pass both"),
    (dict(block_tokens=torch.zeros(3, 4, dtype=torch.int16)), "block_tokens"),
])
@pytest.mark.parametrize("via", sorted(PROBES))
def test_verify_chain_guards_stop_direct_calls(change, message, via):
    """Direct callers of torch.ops.dflash.verify_chain_cuda get a guard, never an
    out-of-bounds access (the same host path as the CUDA op, on CPU tensors)."""
    with pytest.raises(RuntimeError, match="verify_chain_cuda: " + message):
        PROBES[via]("verify_chain")(*_verify_args(**change))


@pytest.mark.parametrize("change, message", [
    (dict(k=torch.randn(5, 3, 2, 64)), "k: expected fp16 or bf16"),
    (dict(k=torch.randn(5, 3, 2, 96).half()), "k: head dim must be 64, 128 or 256"),
    (dict(v=torch.randn(5, 3, 2, 64).bfloat16()), "v: expected the shape and dtype of k"),
    (dict(positions=torch.arange(5, dtype=torch.int32)), "positions, slot_mapping: expected contiguous int64"),
    (dict(slot_mapping=torch.arange(10)[::2]), "positions, slot_mapping: expected contiguous int64"),
    (dict(k_caches=[torch.zeros(4, 4, 2, 64).half()] * 2), "k_caches, v_caches: expected L per-layer caches"),
    (dict(k_caches=[torch.zeros(4, 4, 2, 64).half(), torch.zeros(5, 4, 2, 64).half(),
                    torch.zeros(4, 4, 2, 64).half()]),
     "k_caches, v_caches: every layer needs the shape"),
    (dict(v_caches=[torch.zeros(4, 8, 2, 64).half()] * 3),
     "v_caches: expected the shape and dtype of k_caches"),
    (dict(k_caches=[torch.zeros(4, 4, 2, 64).to(torch.float8_e4m3fn)] * 3,
          v_caches=[torch.zeros(4, 4, 2, 64).to(torch.float8_e4m3fn)] * 3),
     "k_scale, v_scale: required"),
    (dict(k_caches=[torch.zeros(4, 4, 2, 64).to(torch.float8_e4m3fn)] * 3,
          v_caches=[torch.zeros(4, 4, 2, 64).to(torch.float8_e4m3fn)] * 3,
          k_scale=torch.ones(1), v_scale=torch.ones(1).double()), "k_scale, v_scale: expected fp32"),
    (dict(rotary_dim=63), "rotary_dim: expected an even number"),
    (dict(cos_sin_cache=torch.randn(9, 32)), "cos_sin_cache: expected fp32"),
    (dict(k_norm_weight=torch.ones(3, 32)), "k_norm_weight: expected"),
])
@pytest.mark.parametrize("via", sorted(PROBES))
def test_write_kv_guards_stop_direct_calls(change, message, via):
    """Direct callers of torch.ops.dflash.write_kv_cuda get a guard, never an
    out-of-bounds access (the same host path as the CUDA op, on CPU tensors)."""
    with pytest.raises(RuntimeError, match="write_kv_cuda: " + message):
        PROBES[via]("write_kv")(*_write_kv_args(**change))


def test_binary_holds_sass_for_every_target():
    targets = _targets()
    assert targets, "the extension does not record its SASS targets"
    elves = _cuobjdump("--list-elf")
    for name in KERNEL_FILES:
        for sm in targets:
            assert re.search(rf"{name}\.sm_{sm}\.cubin", elves), (name, sm, elves)
    if not torch.cuda.is_available():
        # The no-GPU default build (TORCH_CUDA_ARCH_LIST unset, or CI's 9.0a;10.0a).
        assert targets >= DEFAULT_TARGETS


def _resource_rows():
    text = _cuobjdump("--dump-resource-usage")
    rows, arch = [], None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            rows.append({"arch": arch, "name": m.group(1)})
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and rows and "reg" not in rows[-1]:
            rows[-1].update(zip(("reg", "stack", "shared", "local"), map(int, m.groups())))
    return rows


def test_no_kernel_spills_or_uses_a_stack():
    rows = _resource_rows()
    names = {r["name"] for r in rows}
    # 2 verify kernels (3 logits dtypes + 2 token dtypes) and 18 write_kv
    # instances (2 act dtypes x 3 head dims x 3 cache kinds), per target.
    assert sum("split_argmax_kernel" in n for n in names) == 3
    assert sum("accept_kernel" in n for n in names) == 2
    assert sum("write_kv_kernel" in n for n in names) == 18
    assert len(rows) == 23 * len(_targets())
    for r in rows:
        assert r["local"] == 0 and r["stack"] == 0, r
        assert r["reg"] <= 64, r  # 256-thread blocks keep full occupancy headroom


def test_cuda_sources_keep_pytorch_out():
    """Only csrc/bindings/ sees ATen/torch: the kernels and their host path
    stay embeddable and fast to build."""
    pattern = re.compile(r'#\s*include\s*[<"](torch|ATen|c10|pybind11|Python)')
    sources = [p for ext in ("cu", "cuh", "h") for p in CSRC.glob(f"*.{ext}")]
    assert len(sources) >= 8, sources
    for path in sources + list((CSRC / "testing").iterdir()):
        assert not pattern.search(path.read_text()), path
    assert any(pattern.search(path.read_text()) for path in (CSRC / "bindings").iterdir())


# ------------------------------------------------ fp32 rounding of the sampled score

FAST_MATH_FLAGS = re.compile(
    r"use_fast_math|ftz\s*=\s*true|prec-div\s*=\s*false|prec-sqrt\s*=\s*false|"
    r"-ffast-math")


def test_build_flags_keep_ieee_fp32():
    """No flag of setup.py, CMakeLists.txt or torch's default nvcc flags turns on
    fast math, flush-to-zero or approximate division: the Gumbel noise needs the
    IEEE logf and the score ``logit * (1/T) + g`` the reference's rounding."""
    from torch.utils import cpp_extension

    for path in (ROOT / "setup.py", ROOT / "CMakeLists.txt"):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        assert not FAST_MATH_FLAGS.search(code), (path, FAST_MATH_FLAGS.search(code))
    assert not FAST_MATH_FLAGS.search(" ".join(cpp_extension.COMMON_NVCC_FLAGS))


def test_binary_sampling_kernel_uses_the_ieee_logf():
    """--use_fast_math turns logf into __logf (MUFU.LG2 in SASS) and would change
    the noise: the built split_argmax kernels hold no MUFU.LG2."""
    sass = _cuobjdump("-sass")
    bodies = re.split(r"\n\s*Function : ", sass)
    kernels = [b for b in bodies if b.startswith("_ZN6dflash6verify19split_argmax_kernel")]
    assert len(kernels) == 3 * len(_targets())
    for body in kernels:
        assert "MUFU.LG2" not in body, body.split("\n", 1)[0]


def _ptx_functions(ptx):
    """{entry name: body} of a PTX module."""
    out = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\((.*?)\n}\n", ptx, re.S):
        out[m.group(1)] = m.group(2)
    return out


@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
def test_sampled_score_is_a_separate_multiply_and_add(arch, tmp_path):
    """``logit * (1/T) + g`` must round twice, like the reference's separate
    multiply and add (nvcc contracts a plain ``a * b + c`` into one FMA by
    default, which changes some tokens). ``mul.rn`` / ``add.rn`` are never
    contracted by ptxas, so in the PTX every add.rn.f32 of a split_argmax kernel
    adds the result of a mul.rn.f32, with no flush-to-zero."""
    import shutil

    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    ptx_path = tmp_path / "verify_chain.ptx"
    cmd = [nvcc, "-O3", "-std=c++17", f"-arch={arch}", "-ptx", *cpp_extension.COMMON_NVCC_FLAGS,
           f"-I{CSRC}", str(CSRC / "verify_chain.cu"), "-o", str(ptx_path)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    funcs = {name: body for name, body in _ptx_functions(ptx_path.read_text()).items()
             if "split_argmax_kernel" in name}
    assert len(funcs) == 3, list(funcs)
    for name, body in funcs.items():
        products = set(re.findall(r"mul\.rn\.f32\s+(%f\d+),", body))
        adds = re.findall(r"add\.rn\.f32\s+%f\d+,\s*(%f\d+),\s*(%f\d+);", body)
        assert products and len(adds) == len(products), (name, len(products), len(adds))
        for a, b in adds:
            assert a in products or b in products, (name, a, b)
        assert not re.search(r"(mul|add)\.rn\.ftz\.f32", body), name
        assert "lg2.approx" not in body, name


def test_sampled_score_source_uses_rounding_intrinsics():
    """The host emulator cannot see FMA contraction (x86 g++ does not contract
    without -mfma): keep the spelled-out rounding in the kernel source."""
    src = (CSRC / "verify_chain.cuh").read_text()
    assert re.search(r"__fadd_rn\(\s*__fmul_rn\(\s*s,\s*key\.inv_t\s*\)", src)
    assert "key.inv_t = __frcp_rn(t)" in src
