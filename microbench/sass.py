"""``python -m microbench sass``: the compile report (docs/benchmark.md, "Compile report").

Compiles every Triton kernel of the package at its production configurations
(H200 / B200 launches: the configs and the divisibility hints a real launch
gets) for sm_90a and sm_100a without a GPU, reads every kernel of the built
extension ``dflash_kernels/_C*.so``, and reports per kernel and arch:
registers, spills, shared memory, CTAs/SM, and per loop of the SASS the global
loads by kind and width, the MMA kind, tiles in flight and instructions per
byte. The parsing and the occupancy model are plain functions (``parse_sass``,
``find_loops``, ``analyze``, ``occupancy``) so the tests assert budgets from
the same numbers the table prints.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .compile import TritonJob, compile_many, cuobjdump, resource_usage, sass_text

# ---------------------------------------------------------------------------
# Arch limits (CUDA C Programming Guide, "Technical Specifications per Compute
# Capability": the same for 9.0 and 10.0). Shared memory per SM is 228 KB of
# which one block may use 227 KB; the system reserves 1 KB per resident CTA.
# ---------------------------------------------------------------------------

LIMITS = {
    arch: dict(regs_per_sm=65536, max_regs_per_thread=255, reg_alloc_unit=256, max_warps=64,
               max_ctas=32, smem_per_sm=228 * 1024, smem_per_block=227 * 1024,
               smem_reserved_per_block=1024, smem_alloc_unit=128)
    for arch in (90, 100)
}
SMS = {90: 132, 100: 148}        # H200, B200
DEVICES = {90: "H100/H200", 100: "B200"}


def occupancy(arch: int, registers: int, smem: int, threads: int) -> dict:
    """Resident CTAs per SM from registers, shared memory and warps, and which one limits it.

    Registers are allocated per warp in units of ``reg_alloc_unit`` (regs/thread
    rounded up to a multiple of 8, times 32). ``smem`` is the CTA's whole shared
    memory including the 1 KB system reserve (``cuobjdump``'s static SHARED of
    an sm_90 / sm_100 cubin already counts it: a kernel with no shared memory
    reports 1024), rounded up to 128 bytes; at most 227 KB + the reserve per CTA.
    """
    lim = LIMITS[arch]
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // lim["reg_alloc_unit"]) * lim["reg_alloc_unit"]
    by_regs = (lim["regs_per_sm"] // per_warp) // warps
    by_warps = lim["max_warps"] // warps
    smem = max(smem, lim["smem_reserved_per_block"])
    if smem > lim["smem_per_block"] + lim["smem_reserved_per_block"]:
        by_smem = 0
    else:
        unit = lim["smem_alloc_unit"]
        by_smem = lim["smem_per_sm"] // (-(-smem // unit) * unit)
    limits = dict(registers=by_regs, shared=by_smem, warps=by_warps, ctas=lim["max_ctas"])
    ctas = min(limits.values())
    return dict(ctas_per_sm=ctas, limited_by=min(limits, key=limits.get),
                **{f"by_{k}": v for k, v in limits.items()})


# ---------------------------------------------------------------------------
# SASS parsing
# ---------------------------------------------------------------------------

@dataclass
class Instr:
    addr: int
    pred: str          # "" or e.g. "@!P4"
    op: str            # full mnemonic with modifiers, e.g. "LDG.E.U16"
    operands: str


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")


def parse_sass(text: str) -> Dict[str, List[Instr]]:
    """``cuobjdump -sass`` text -> {function name: instructions in address order}."""
    funcs: Dict[str, List[Instr]] = {}
    cur: Optional[List[Instr]] = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _LINE.search(line)
        if m and cur is not None:
            cur.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3),
                             m.group(4).strip()))
    return funcs


def _branch_target(ins: Instr) -> Optional[int]:
    if ins.op.split(".")[0] != "BRA":
        return None
    hexes = re.findall(r"0x([0-9a-f]+)", ins.operands)
    return int(hexes[-1], 16) if hexes else None


@dataclass
class Loop:
    start: int         # address of the branch target (the loop head)
    end: int           # address of the last backward branch to it
    depth: int = 0     # number of enclosing loops
    inner: tuple = ()  # (start, end) of the loops directly nested inside


def find_loops(instrs: Sequence[Instr]) -> List[Loop]:
    """Loops as the backward branches of the SASS.

    A ``BRA`` (predicated or not) whose target is at or before it closes a loop
    ``[target, branch]``; several backward branches to one target (``continue``
    paths) are one loop ending at the last of them. The self-branch a function
    ends with (``BRA`` to its own address, after ``EXIT``) is not a loop, nor is
    a branch from the out-of-line blocks after the last ``EXIT`` back into the
    body (ptxas moves the slow path of an mbarrier wait there: it jumps back to
    just after the wait, which closes no loop of the source). A loop
    whose range holds another's is its parent; each loop's own body excludes
    the ranges of the loops nested inside it.
    """
    ends: Dict[int, int] = {}
    last_exit = max((i.addr for i in instrs if i.op == "EXIT"), default=None)
    for ins in instrs:
        t = _branch_target(ins)
        if last_exit is not None and ins.addr > last_exit and t is not None and t < last_exit:
            continue
        if t is not None and t < ins.addr:
            ends[t] = max(ends.get(t, t), ins.addr)
    loops = [Loop(s, e) for s, e in sorted(ends.items())]
    for lp in loops:
        parents = [o for o in loops if o is not lp and o.start <= lp.start and lp.end <= o.end]
        lp.depth = len(parents)
    for lp in loops:
        kids = [o for o in loops if o is not lp and lp.start <= o.start and o.end <= lp.end
                and o.depth == lp.depth + 1]
        lp.inner = tuple((k.start, k.end) for k in kids)
    return loops


def load_kind(op: str) -> Optional[tuple]:
    """(kind, bytes per thread) of a global load mnemonic, or None if it is not one.

    kinds: ``LDG`` (to registers), ``LDGSTS`` (cp.async to shared), ``TMA``
    (UTMALDG / UBLKCP bulk copies: bytes per instruction not in the SASS, 0),
    ``LD`` (generic-space loads, which may hit global memory).
    """
    parts = op.split(".")
    base = parts[0]
    if base in ("UTMALDG", "UBLKCP", "UTMAPF") or base.startswith("UTMALDG"):
        return ("TMA", 0) if base != "UTMAPF" else None
    if base not in ("LDG", "LDGSTS", "LD"):
        return None
    width = 4
    for p in parts[1:]:
        if p in ("U8", "S8"):
            width = 1
        elif p in ("U16", "S16"):
            width = 2
        elif p in ("64", "128", "256"):
            width = int(p) // 8
    return (base, width)


def mma_kind(op: str) -> Optional[str]:
    base = op.split(".")[0]
    if base in ("HMMA", "IMMA", "DMMA", "QMMA", "OMMA"):
        return "mma.sync"
    if base in ("HGMMA", "QGMMA", "IGMMA", "BGMMA"):
        return "wgmma"
    if base.startswith("UTC") and base.endswith("MMA"):
        return "tcgen05"
    return None


_DEPBAR = re.compile(r"SB0\s*,\s*0x([0-9a-f]+)")


def _own(instrs: Sequence[Instr], lp: Loop) -> List[Instr]:
    return [i for i in instrs if lp.start <= i.addr <= lp.end
            and not any(s <= i.addr <= e for s, e in lp.inner)]


def loop_report(instrs: Sequence[Instr], lp: Loop) -> dict:
    """What one loop's own body does per iteration (per thread).

    ``instructions``: SASS instructions of the body (each executes once per
    thread per iteration); ``loads``: ``{"LDG.E.U16": n, ...}``;
    ``load_bytes``: bytes one thread's loads request per iteration (TMA counts
    0: its size is in the descriptor); ``instr_per_byte`` = instructions /
    load_bytes; ``tiles_in_flight``: for cp.async, ``1 + N // G`` with N the
    smallest ``DEPBAR.LE SB0, N`` in the body (commit groups that may stay
    outstanding at the wait) and G the ``LDGDEPBAR`` commits per iteration;
    1 for a loop of register loads only (consumed in the iteration that loads
    them: register-level software pipelining is not detected); None without
    global loads.
    """
    body = _own(instrs, lp)
    loads: Dict[str, int] = {}
    kinds: Dict[str, int] = {}
    nbytes = 0
    for i in body:
        k = load_kind(i.op)
        if k:
            loads[i.op] = loads.get(i.op, 0) + 1
            label = f"{k[0]}.{k[1] * 8}" if k[0] != "TMA" else "TMA"
            kinds[label] = kinds.get(label, 0) + 1
            nbytes += k[1]
    ops = [i.op for i in body]
    commits = sum(op == "LDGDEPBAR" for op in ops)
    waits = [int(m.group(1), 16) for i in body if i.op.startswith("DEPBAR")
             for m in [_DEPBAR.search(i.operands)] if m]
    if commits and waits:
        tiles = 1 + min(waits) // commits
    elif any(k.startswith("LDGSTS") for k in kinds) or "TMA" in kinds:
        tiles = None    # waits outside this loop body (or on mbarriers): see the SASS
    elif loads:
        tiles = 1
    else:
        tiles = None
    mmas = sorted({mma_kind(o) for o in ops if mma_kind(o)})
    return dict(
        start=lp.start, end=lp.end, depth=lp.depth, nested=len(lp.inner),
        instructions=len(body), loads=loads, load_kinds=kinds, load_bytes=nbytes,
        instr_per_byte=round(len(body) / nbytes, 2) if nbytes else None,
        min_load_width=min((load_kind(o)[1] for o in loads if load_kind(o)[0] != "TMA"), default=None),
        commits=commits, depbar_le=min(waits) if waits else None, tiles_in_flight=tiles,
        barriers=sum(o.startswith("BAR") for o in ops),
        shared_ops=sum(o.split(".")[0] in ("LDS", "STS", "LDSM", "STSM") for o in ops),
        mma=mmas,
    )


def analyze(instrs: Sequence[Instr]) -> dict:
    """Loops with their reports, the kernel's MMA kinds and which loop is the main one.

    Main loop: of the loops whose own body loads from global memory, the one
    loading the most bytes per thread per iteration (ties: more instructions,
    then the earlier loop).
    """
    loops = [loop_report(instrs, lp) for lp in find_loops(instrs)]
    with_loads = [i for i, lp in enumerate(loops) if lp["loads"]]
    main = max(with_loads, key=lambda i: (loops[i]["load_bytes"], loops[i]["instructions"], -i),
               default=None)
    mmas = sorted({mma_kind(i.op) for i in instrs if mma_kind(i.op)})
    return dict(loops=loops, main_loop=main, mma=mmas, instructions=len(instrs),
                uses_tma=any(load_kind(i.op) == ("TMA", 0) for i in instrs))


# ---------------------------------------------------------------------------
# The catalog: every Triton kernel at its production configurations
# ---------------------------------------------------------------------------

_TB = "dflash_kernels.triton_backend"
_TL = {"bf16": "bf16", "fp8": "fp8e4nv"}


# The verify kernels' ragged-layout arguments (issue 18) at their padded-call values:
# rows_pass / _launch pass none of them for a padded batch.
_VERIFY_PADDED = dict(RAGGED=("constexpr", False), cu_ptr=None, T=("constexpr", 1))
# The row kernel's split-search arguments (issue 13) as rows_pass passes them without it;
# KEYDT 1: the catalog's bf16 logits are searched on their 16-bit keys.
_VERIFY_SINGLE = dict(SEARCH_SPLIT=("constexpr", False), st_ptr=None, cnt_ptr=None,
                      mx_ptr=None, pst_ptr=None, pms_ptr=None, pzf_ptr=None, NCOUNT=0, NMASS=0,
                      NSPLIT_P2=("constexpr", 1), KEYDT=("constexpr", 1))


def _verify_fold(S: int, ns: int, V: int, dp: bool, ragged: bool) -> dict:
    """The row kernel's folded-finish arguments as verify_chain._launch passes them (one
    launch, issue 11): counters, block_tokens int64, num_drafts / seq_lens / outputs int32,
    draft_probs bf16 (``dp``) or the fp32 placeholder, ``NSPLIT_P2`` for the partials'
    combine. Ragged: flat block_tokens [T] and draft_probs [T, V] (row strides only)."""
    return dict(
        NSPLIT_P2=("constexpr", 1 << (ns - 1).bit_length()), FOLD=("constexpr", True),
        arr_ptr="*i32", bt_ptr="*i64", stride_tb=1 if ragged else S, nd_ptr="*i32",
        dp_ptr="*bf16" if dp else "*fp32", stride_db=(0 if ragged else (S - 1) * V) if dp else 0,
        stride_ds=V if dp else 0, seq_ptr="*i32", acc_ptr="*i32", out_ptr="*i32",
        bonus_ptr="*i32", nsl_ptr="*i32", HAS_SEQ=("constexpr", True),
        S_P2=("constexpr", 1 << (S - 1).bit_length()))


# The same arguments as a launch without the fold passes them (verify_tree's row pass).
_VERIFY_UNFOLDED = {n: ("constexpr", v) if isinstance(v, bool) or n == "S_P2" else v
                    for n, v in dict(FOLD=False, arr_ptr=None, bt_ptr=None, stride_tb=0,
                                     nd_ptr=None, dp_ptr=None, stride_db=0, stride_ds=0,
                                     seq_ptr=None, acc_ptr=None, out_ptr=None, bonus_ptr=None,
                                     nsl_ptr=None, HAS_SEQ=False, S_P2=1).items()}


def _verify_compact(both: bool) -> dict:
    """The row kernel's top-p workspace as rows_pass passes it: with top-k and top-p in one
    program, COMPACT_CAP elements per row (bf16 logits); else none (CAP 0)."""
    from dflash_kernels.triton_backend import verify_chain as tv

    if both and tv.COMPACT_CAP:
        return dict(CAP=_c(tv.COMPACT_CAP), ws_ptr="*bf16", ctr_ptr="*i32")
    return dict(CAP=_c(0), ws_ptr=None, ctr_ptr=None)


def launch_job(module: str, kernel: str, params: dict, num_warps: int = 4, num_stages: int = 3,
               options: Optional[dict] = None) -> TritonJob:
    """A TritonJob as Triton's launcher specializes a call with these arguments.

    ``params`` maps each argument, in order, to a pointer type (``"*bf16"``: a
    16-byte aligned tensor), an int (its production value: 1 becomes a
    constexpr, multiples of 16 get ``tt.divisibility`` 16, as the launcher does),
    a float (fp32), ``None`` (a constexpr None) or ``("constexpr", value)``.
    """
    sig, const, div = {}, {}, {}
    for name, v in params.items():
        if isinstance(v, tuple) and v[0] == "constexpr":
            sig[name], const[name] = "constexpr", v[1]
        elif v is None:
            sig[name], const[name] = "constexpr", None
        elif isinstance(v, str):
            sig[name] = v
            div[name] = 16
        elif isinstance(v, bool):
            sig[name], const[name] = "constexpr", v
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1:
            sig[name], const[name] = "constexpr", 1
        else:
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                div[name] = 16
    return TritonJob(module, kernel, sig, const, num_warps, num_stages, div, dict(options or {}))


def _c(v):
    return ("constexpr", v)


def _inject_job(op: str, arch: int, cache_dtype, split: bool = False) -> TritonJob:
    """inject_kv / fuse GEMM from the op module's ``compile_spec`` (H 4096, D 128, bf16;
    ``split``: inject_kv's split-K kernel)."""
    import importlib

    import torch

    mod = f"{_TB}.{op}"
    fn = importlib.import_module(mod).compile_spec
    if op == "inject_kv":
        spec = fn(arch, torch.bfloat16, cache_dtype, D=128, split=split)
    else:
        spec = fn(arch, torch.bfloat16)
    return TritonJob(mod, spec["kernel"], spec["signature"], spec["constexprs"], spec["num_warps"],
                     spec["num_stages"], {n: 16 for n in spec["divisible_by_16"]})


def _verify_nsplit(arch: int, rows: int, V: int, block: int = 1024) -> int:
    """verify_chain.num_splits on an H200 / B200 (4 programs per SM, at most 64 splits)."""
    n_blocks = -(-V // block)
    want = max(1, min(n_blocks, -(-4 * SMS[arch] // rows), 64))
    per = -(-n_blocks // want)
    return -(-n_blocks // per)


def catalog(arch: int) -> List[tuple]:
    """``[(name, TritonJob)]``: every Triton kernel at its production configurations on sm_{arch}.

    block_attention: D 128, Hkv 8, group 4, S 16 with the block's own keys
    (the production tile; the split count only changes the epilogue),
    bf16 and fp8-e4m3 caches, page 16 and 1, and page 16 with a window of
    256 (``block_attention.window.*``), and split at B 1, ctx 4k
    (``block_attention.split.*``: the merge folded in). verify_chain: B 1, S 16,
    V 151,936 bf16 logits, as verify_chain._launch would launch it (one
    launch: the row kernel runs its requests' finish; ``rows.draft_probs``
    with draft_probs), padded and ragged (``verify_chain.ragged.*``: flat
    ``[T, V]`` rows with ``cu_rows``), and top-k + top-p in SGLang's joint order
    (``verify_chain.joint.*``). The injection ops at
    H 4096, D 128, Hkv 8, N 16, bf16.
    """
    import torch

    from dflash_kernels.triton_backend import block_attention as ba

    out = []
    for cache in ("bf16", "fp8"):
        cdt = torch.bfloat16 if cache == "bf16" else torch.float8_e4m3fn
        for page in (16, 1):
            s = ba.compile_spec(arch, torch.bfloat16, cdt, S=16, Hq=32, Hkv=8, D=128, page_size=page,
                                tma=False)
            out.append((f"block_attention.{cache}.page{page}", TritonJob(
                f"{_TB}.block_attention", "_block_attention_kernel", s["signature"],
                s["constexprs"], s["num_warps"], s["num_stages"], s["divisibility"], s["options"])))
    # A sliding window (256, bf16 activations, the block's own keys): the main loop between
    # the window's edge tiles, and the edge and NaN-mark loops (docs/block_attention.md).
    for cache in ("bf16", "fp8"):
        cdt = torch.bfloat16 if cache == "bf16" else torch.float8_e4m3fn
        s = ba.compile_spec(arch, torch.bfloat16, cdt, S=16, Hq=32, Hkv=8, D=128, page_size=16,
                            window=256, tma=False)
        out.append((f"block_attention.window.{cache}.page16", TritonJob(
            f"{_TB}.block_attention", "_block_attention_kernel", s["signature"],
            s["constexprs"], s["num_warps"], s["num_stages"], s["divisibility"], s["options"])))
    # The TMA path (docs/block_attention.md, "TMA path"): one box per tile at page 64 (both
    # archs; the default there), next to the cp.async build of the same launch, and
    # Blackwell's row gather at pages 16 and 1 (sm_100a only: ptxas rejects gather4 for sm_90a).
    pages = (64, 16, 1) if arch != 90 else (64,)
    for cache in ("bf16", "fp8"):
        cdt = torch.bfloat16 if cache == "bf16" else torch.float8_e4m3fn
        s = ba.compile_spec(arch, torch.bfloat16, cdt, S=16, Hq=32, Hkv=8, D=128, page_size=64,
                            tma=False)
        out.append((f"block_attention.{cache}.page64", TritonJob(
            f"{_TB}.block_attention", "_block_attention_kernel", s["signature"],
            s["constexprs"], s["num_warps"], s["num_stages"], s["divisibility"], s["options"])))
        for page in pages:
            s = ba.compile_spec(arch, torch.bfloat16, cdt, S=16, Hq=32, Hkv=8, D=128,
                                page_size=page, tma=True)
            out.append((f"block_attention.tma.{cache}.page{page}", TritonJob(
                f"{_TB}.block_attention", "_block_attention_kernel", s["signature"],
                s["constexprs"], s["num_warps"], s["num_stages"], s["divisibility"], s["options"])))
    # A split launch (its merge folded in: the last split to arrive merges) at B 1, ctx 4k
    # (16 splits on an H200 and on a B200); otherwise the rows above.
    nsp = ba.plan(arch, SMS[arch], 1, 16, 32, 8, 128, 16, 256, 0)["NUM_SPLITS"]
    for cache in ("bf16", "fp8"):
        cdt = torch.bfloat16 if cache == "bf16" else torch.float8_e4m3fn
        for page in (16, 1):
            s = ba.compile_spec(arch, torch.bfloat16, cdt, S=16, Hq=32, Hkv=8, D=128,
                                page_size=page, num_splits=nsp)
            out.append((f"block_attention.split.{cache}.page{page}", TritonJob(
                f"{_TB}.block_attention", "_block_attention_kernel", s["signature"],
                s["constexprs"], s["num_warps"], s["num_stages"], s["divisibility"],
                s["options"])))

    from dflash_kernels.triton_backend import verify_chain as tv

    B, S, V = 1, 16, 151936
    ns = _verify_nsplit(arch, B * S, V)
    chunk = -(-(-(-V // tv.BLOCK_V)) // ns) * tv.BLOCK_V
    vmod = f"{_TB}.verify_chain"
    rows_common = dict(logits_ptr="*bf16", stride_lb=S * V, stride_ls=V, temp_ptr="*fp32",
                       topk_ptr="*i32", topp_ptr="*fp32", seed_ptr="*i64", pos_ptr="*i64",
                       pval_ptr="*fp32", pidx_ptr="*i32", pm_ptr="*fp32", pz_ptr="*fp32",
                       thr_ptr="*fp32", S=S, V=V, CHUNK=chunk, NSPLIT=ns)
    # Every row launch of verify_chain runs its requests' finish (the fold); draft_probs:
    # sampled rows with the online max / sum-exp and the finish's residual pass.
    variants = {"greedy": (False, False, False), "sampled": (True, False, False),
                "topk_topp": (True, True, True), "draft_probs": (True, False, False)}
    # The ragged layout (vLLM's cu_num_logits): logits [T, V] with T = B*S flat rows, row
    # stride only (rows_pass: stride_lb 0), cu_rows int32 [B+1]; SGLang's joint top-k + top-p
    # order on the padded layout (rows_pass passes JOINT only with both filters).
    ragged = dict(RAGGED=_c(True), cu_ptr="*i32", T=B * S)
    layouts = {"": (dict(_VERIFY_PADDED), {}), "ragged.": (ragged, dict(stride_lb=0))}
    for name, (temp, topk, topp) in variants.items():
        # Greedy-only calls take the wide tile and its own split count (rows_pass).
        blk = tv.BLOCK_V if temp else tv.GREEDY_BLOCK_V
        nsv = _verify_nsplit(arch, B * S, V, blk)
        chunk_v = -(-(-(-V // blk)) // nsv) * blk
        joints = (False, True) if topk and topp else (False,)
        cap = {} if temp else dict(maxnreg=tv.GREEDY_MAXNREG)     # rows_pass: greedy-only
        for suffix, (lay, strides) in layouts.items():
            for joint in joints:
                if joint and suffix:
                    continue            # joint comes from SGLang (padded), ragged from vLLM
                tag = f"verify_chain.{suffix}{'joint.' if joint else ''}rows.{name}"
                dp = name == "draft_probs"
                out.append((tag, launch_job(vmod, "_verify_rows_kernel", dict(
                    rows_common, **strides, CHUNK=chunk_v, NSPLIT=nsv, HAS_TEMP=_c(temp),
                    HAS_TOPK=_c(topk), HAS_TOPP=_c(topp), NEED_MZ=_c(dp),
                    BLOCK=_c(blk), SBLOCK=_c(tv.SEARCH_BLOCK_V), KWAY=_c(tv.KWAY),
                    HAS_TREE=_c(False), par_ptr=_c(None), stride_pb=_c(0), PRUNE=_c(tv.PRUNE),
                    **lay, JOINT=_c(joint),
                    **dict(_VERIFY_SINGLE, **_verify_fold(S, nsv, V, dp, bool(suffix))),
                    **_verify_compact(topk and topp)),
                    num_warps=4, options=dict(enable_fp_fusion=False, **cap))))
    # The split search (issue 13; rows_pass takes it at B*S * 2 <= SMs, so here): the count
    # pass and the top-p mass pass, each launched search_launches() times, and the row kernel
    # that reads their state and streams its chunk (top-k alone, top-k + top-p).
    nc, nm = tv.search_launches(True, True, torch.bfloat16)
    search = dict(logits_ptr="*bf16", stride_lb=S * V, stride_ls=V, temp_ptr="*fp32",
                  topk_ptr="*i32", topp_ptr="*fp32", st_ptr="*i64", cnt_ptr="*i32",
                  mx_ptr="*fp32")
    tail = dict(ROWS=B * S, S=S, V=V, CHUNK=chunk, NSPLIT=ns, KEYDT=_c(1), KWAY=_c(tv.KWAY),
                SBLOCK=_c(tv.SEARCH_BLOCK_V), NSPLIT_P2=_c(1 << (ns - 1).bit_length()),
                **_VERIFY_PADDED)
    out.append(("verify_chain.split.count", launch_job(vmod, "_search_count_kernel", dict(
        search, t=nc - 1, **tail, HAS_TOPK=_c(True), HAS_TOPP=_c(True)),
        num_warps=4, options=dict(enable_fp_fusion=False))))
    out.append(("verify_chain.split.mass", launch_job(vmod, "_search_mass_kernel", dict(
        search, pst_ptr="*i64", pms_ptr="*i64", pzf_ptr="*i64", u=nm - 1, NCOUNT=nc, **tail,
        HAS_TOPK=_c(True), JOINT=_c(False)),
        num_warps=4, options=dict(enable_fp_fusion=False))))
    for name, topp in (("topk", False), ("topk_topp", True)):
        nc, nm = tv.search_launches(True, topp, torch.bfloat16)
        out.append((f"verify_chain.split.rows.{name}", launch_job(vmod, "_verify_rows_kernel", dict(
            rows_common, HAS_TEMP=_c(True), HAS_TOPK=_c(True), HAS_TOPP=_c(topp),
            NEED_MZ=_c(False), BLOCK=_c(tv.BLOCK_V), SBLOCK=_c(tv.SEARCH_BLOCK_V),
            KWAY=_c(tv.KWAY), HAS_TREE=_c(False), par_ptr=_c(None), stride_pb=_c(0),
            PRUNE=_c(tv.PRUNE), **_VERIFY_PADDED, JOINT=_c(False), SEARCH_SPLIT=_c(True),
            st_ptr="*i64", cnt_ptr="*i32", mx_ptr="*fp32", pst_ptr="*i64", pms_ptr="*i64",
            pzf_ptr="*i64", NCOUNT=nc, NMASS=nm, KEYDT=_c(1),
            **_verify_fold(S, ns, V, False, False), **_verify_compact(False)),
            num_warps=4, options=dict(enable_fp_fusion=False))))
    out.append(("inject_kv.bf16", _inject_job("inject_kv", arch, torch.bfloat16)))
    out.append(("inject_kv.fp8", _inject_job("inject_kv", arch, torch.float8_e4m3fn)))
    # The split-K kernel (N 16 .. 128 at L 5 on an H200 / B200; docs/inject.md).
    out.append(("inject_kv.split.bf16", _inject_job("inject_kv", arch, torch.bfloat16, split=True)))
    out.append(("inject_kv.split.fp8", _inject_job("inject_kv", arch, torch.float8_e4m3fn,
                                                   split=True)))
    # write_kv: N 16, L 5, Hkv 8, D 128, stacked bf16 caches of 4096 pages of 16.
    L, Hkv, D, page, pages = 5, 8, 128, 16, 4096
    cache_layer = pages * page * Hkv * D
    out.append(("write_kv.bf16", launch_job(f"{_TB}.write_kv", "_write_kv_kernel", dict(
        k_ptr="*bf16", v_ptr="*bf16", sk_n=L * Hkv * D, sk_l=Hkv * D, sk_h=D, sv_n=L * Hkv * D,
        sv_l=Hkv * D, sv_h=D, knw_ptr="*bf16", stride_knl=D, pos_ptr="*i64", stride_pos=1,
        slot_ptr="*i64", stride_slot=1, cs_ptr="*fp32", stride_cs=D,
        kc_ptr="*bf16", kc_table="*i64", stride_kl=cache_layer, ks_page=page * Hkv * D,
        ks_row=Hkv * D, ks_head=D, k_scale_ptr=None,
        vc_ptr="*bf16", vc_table="*i64", stride_vl=cache_layer, vs_page=page * Hkv * D,
        vs_row=Hkv * D, vs_head=D, v_scale_ptr=None,
        N=16, Hkv=Hkv, page_size=page, num_slots=pages * page, max_pos=4096,
        rot_half=D // 2, eps=1e-6,
        D=_c(D), BLOCK_M=_c(16), NEOX=_c(True), HAS_KNORM=_c(True), FP8=_c(False),
        FP8_MAX=_c(0.0), UNIFORM_K=_c(True), UNIFORM_V=_c(True)), num_warps=4)))
    Hq, Nrows = 32, 16
    out.append(("norm_rope.bf16", launch_job(f"{_TB}.norm_rope", "_norm_rope_kernel", dict(
        q_ptr="*bf16", k_ptr="*bf16", sq_n=Hq * D, sq_h=D, sk_n=Hkv * D, sk_h=D, pos_ptr="*i64",
        qw_ptr="*bf16", kw_ptr="*bf16", cs_ptr="*fp32", stride_cs=D, N=Nrows, Hq=Hq,
        max_pos=4096, rot_half=D // 2, eps=1e-6, D=_c(D), BLOCK_M=_c(16), NEOX=_c(True),
        HAS_QNORM=_c(True), HAS_KNORM=_c(True)), num_warps=4)))
    out.append(("fuse_target_features.gemm", _inject_job("fuse_target_features", arch, None)))
    # The norm: N 16, H 4096, 8 split-K partials (the GEMM's split at N 16 on 132 SMs x 2).
    out.append(("fuse_target_features.norm", launch_job(
        f"{_TB}.fuse_target_features",
        "_fuse_norm_kernel", dict(ws_ptr="*fp32", nw_ptr="*bf16", out_ptr="*bf16",
                                  stride_out=4096, N=16, H=4096, num_splits=8, eps=1e-6,
                                  BLOCK_H=_c(1024)), num_warps=4)))
    out += _tree_catalog(arch)
    return out


def _tree_catalog(arch: int) -> List[tuple]:
    """The tree ops (docs/tree.md) at production configurations (kept apart from ``catalog``'s
    body so that edits to the other entries merge cleanly).

    verify_tree: the row kernel with HAS_TREE (sampled, and with top-k + top-p), B 1, N 64,
    V 151,936 bf16 logits, as ``verify_chain.rows_pass`` launches it for a tree (greedy tree
    rows are the chain's greedy kernel, already in the catalog); the walk kernel at N 64 and
    256 with its split count. tree_mask at N 64 and 256. copy_kv: stacked bf16 caches, L 5,
    Hkv 8, D 128, sources in registers (M <= 16) and staged (M > 16). block_attention over the
    cached block (k_block None, the target's verify pass) with a causal and a packed-bits
    mask, S 16, bf16, page 16.
    """
    import torch

    from dflash_kernels.triton_backend import block_attention as ba
    from dflash_kernels.triton_backend import copy_kv as tck
    from dflash_kernels.triton_backend import verify_chain as tv

    out = []
    vmod = f"{_TB}.verify_chain"
    B, N, V = 1, 64, 151936
    ns = _verify_nsplit(arch, B * N, V)
    chunk = -(-(-(-V // tv.BLOCK_V)) // ns) * tv.BLOCK_V
    for name, topk in (("sampled", False), ("topk_topp", True)):
        out.append((f"verify_tree.rows.{name}", launch_job(vmod, "_verify_rows_kernel", dict(
            logits_ptr="*bf16", stride_lb=N * V, stride_ls=V, temp_ptr="*fp32", topk_ptr="*i32",
            topp_ptr="*fp32", seed_ptr="*i64", pos_ptr="*i64", pval_ptr="*fp32", pidx_ptr="*i32",
            pm_ptr="*fp32", pz_ptr="*fp32", thr_ptr="*fp32", S=N, V=V, CHUNK=chunk, NSPLIT=ns,
            HAS_TEMP=_c(True), HAS_TOPK=_c(topk), HAS_TOPP=_c(topk), NEED_MZ=_c(False),
            BLOCK=_c(tv.BLOCK_V), SBLOCK=_c(tv.SEARCH_BLOCK_V), KWAY=_c(tv.KWAY),
            HAS_TREE=_c(True), par_ptr="*i32", stride_pb=N, PRUNE=_c(tv.PRUNE),
            **_VERIFY_PADDED, JOINT=_c(False), **_VERIFY_SINGLE, **_VERIFY_UNFOLDED,
            **_verify_compact(topk)),
            num_warps=4, options=dict(enable_fp_fusion=False))))
    for n in (64, 256):
        nsn = _verify_nsplit(arch, B * n, V)
        out.append((f"verify_tree.walk.n{n}", launch_job(
            f"{_TB}.verify_tree", "_verify_tree_walk_kernel", dict(
                tok_ptr="*i32", par_ptr="*i32", nn_ptr="*i32", seq_ptr="*i32", pval_ptr="*fp32",
                pidx_ptr="*i32", acc_ptr="*i32", nodes_ptr="*i32", out_ptr="*i32",
                bonus_ptr="*i32", nsl_ptr="*i32", N=n, V=V, NSPLIT=nsn, HAS_NN=_c(False),
                HAS_SEQ=_c(True), NSPLIT_P2=_c(1 << (nsn - 1).bit_length()), N_P2=_c(n)),
            num_warps=1)))
    for n in (64, 256):
        w = -(-n // 32)
        out.append((f"tree_mask.n{n}", launch_job(
            f"{_TB}.tree_mask", "_tree_mask_kernel", dict(
                par_ptr="*i32", mask_ptr="*i32", depth_ptr="*i32", N=n, W=w, N_P2=_c(n),
                W_P2=_c(1 << (w - 1).bit_length())), num_warps=4 if n <= 128 else 8)))
    out += _build_tree_catalog(arch)
    L, Hkv, D, page, pages = 5, 8, 128, 16, 4096
    C = Hkv * D
    for name, staged in (("bf16", False), ("bf16.staged", True)):
        out.append((f"copy_kv.{name}", launch_job(f"{_TB}.copy_kv", "_copy_kv_kernel", dict(
            src_ptr="*i64", dst_ptr="*i64", stage_ptr="*i16", M=17 if staged else 15,
            n_slots=pages * page, page_size=page,
            kc_ptr="*i16", kc_table="*i64", k_layer=pages * page * C, k_page=page * C, k_row=C,
            k_head=D, vc_ptr="*i16", vc_table="*i64", v_layer=pages * page * C, v_page=page * C,
            v_row=C, v_head=D, D=_c(D), C=_c(C), ROWS=_c(tck.ROWS),
            COLS=_c(min(tck.COLS, C)), STAGED=_c(staged), UNIFORM_K=_c(True),
            UNIFORM_V=_c(True)), num_warps=4)))
    for mask in ("causal", "bits"):
        s = ba.compile_spec(arch, torch.bfloat16, torch.bfloat16, S=16, Hq=32, Hkv=8, D=128,
                            page_size=16, has_block=False, block_mask=mask)
        out.append((f"block_attention.mask.{mask}", TritonJob(
            f"{_TB}.block_attention", "_block_attention_kernel", s["signature"], s["constexprs"],
            s["num_warps"], s["num_stages"], s["divisibility"])))
    return out


def _build_tree_catalog(arch: int) -> List[tuple]:
    """build_tree at its production configuration: B 1, S 16 (15 draft rows), V 151,936
    bf16 draft logits, top_k 8; the top-k pass with its split count for 132 SMs, the
    selection at N 64 and 256."""
    from dflash_kernels.triton_backend import build_tree as bt

    B, D, V, k = 1, 15, 151936, 8
    block = bt.BLOCK
    splits, chunk = bt.split(2 * 132, B, D, V, block)
    out = [("build_tree.topk", launch_job(f"{_TB}.build_tree", "_build_tree_topk_kernel", dict(
        x_ptr="*bf16", stride_b=D * V, stride_d=V, D=D, V=V, chunk=chunk, temp_ptr="*fp32",
        keys_ptr="*i64", stats_ptr="*fp32", k=k, HAS_T=_c(True), EPS=_c(bt.SAMPLING_EPS),
        KP=_c(k), BLOCK=_c(block)), num_warps=bt.TOPK_WARPS))]
    for n in (64, 256):
        out.append((f"build_tree.select.n{n}", launch_job(
            f"{_TB}.build_tree", "_build_tree_select_kernel", dict(
                keys_ptr="*i64", stats_ptr="*fp32", temp_ptr="*fp32", tbl_ptr="*i32", tok_ptr="*i64",
                par_ptr="*i32", num_ptr="*i32", dep_ptr="*i32", D=D, N=n, k=k, splits=splits,
                steps=n, HAS_T=_c(True), EPS=_c(bt.SAMPLING_EPS), KP=_c(k),
                SPP=_c(1 << (splits - 1).bit_length()),
                DKP=_c(1 << (D * k - 1).bit_length()), NP=_c(n)),
            num_warps=bt.select_warps(n))))
    return out


# ---------------------------------------------------------------------------
# The CUDA extension
# ---------------------------------------------------------------------------

def extension_path() -> Optional[Path]:
    pkg = Path(__file__).resolve().parent.parent / "dflash_kernels"
    found = sorted(pkg.glob("_C*.so"))
    return found[0] if found else None


def _demangle(names: Sequence[str]) -> Dict[str, str]:
    if not shutil.which("c++filt") or not names:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    pretty = out.splitlines()
    return dict(zip(names, pretty)) if len(pretty) == len(names) else {n: n for n in names}


def _short_name(demangled: str) -> str:
    """``void dflash::verify::f<int>(P)`` -> ``verify::f<int>`` (the parameter list cut at depth 0)."""
    text = re.sub(r"^void ", "", demangled).replace("dflash::", "")
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return text[:i].replace(" ", "")
    return text.replace(" ", "")


def _max_threads(cubin: str) -> Dict[str, int]:
    """Per function, the block size fixed by ``__launch_bounds__`` (EIATTR_MAX_THREADS)."""
    text = cuobjdump("-elf", cubin)
    res, cur, want = {}, None, False
    for line in text.splitlines():
        m = re.match(r"^\.nv\.info\.(\S+)", line.strip())
        if m:
            cur = m.group(1)
        elif "EIATTR_MAX_THREADS" in line or "EIATTR_REQNTID" in line:
            want = True
        elif want and line.strip().startswith("Value:") and cur:
            vals = [int(v, 16) for v in re.findall(r"0x([0-9a-f]+)", line)]
            n = 1
            for v in vals[:3]:
                n *= max(v, 1)
            res[cur] = n
            want = False
    return res


def cuda_kernels(archs: Sequence[int], out_dir: Optional[Path]) -> List[dict]:
    """Every kernel of the built extension for ``archs``: resources and SASS."""
    so = extension_path()
    if so is None:
        return []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([str(_tool("cuobjdump")), "-xelf", "all", str(so)], cwd=tmp,
                       capture_output=True, check=True)
        for cubin in sorted(Path(tmp).glob("*.cubin")):
            m = re.search(r"\.sm_(\d+)a?\.cubin$", cubin.name)
            if not m or int(m.group(1)) not in archs:
                continue
            arch = int(m.group(1))
            text = cuobjdump("-sass", str(cubin))
            funcs = parse_sass(text)
            threads = _max_threads(str(cubin))
            pretty = _demangle([u["function"] for u in resource_usage(str(cubin))])
            if out_dir:
                dst = out_dir / f"sm_{arch}a"
                dst.mkdir(parents=True, exist_ok=True)
                shutil.copy(cubin, dst / f"cuda.{cubin.name}")
                (dst / f"cuda.{cubin.stem}.sass").write_text(text)
            for u in resource_usage(str(cubin)):
                fn = u["function"]
                name = "cuda." + _short_name(pretty[fn])
                rows.append(finish_row(name, arch, fn, u, u["shared_static"], threads.get(fn),
                                       funcs.get(fn, []), source=cubin.name))
    return rows


def _tool(name: str) -> Path:
    from .compile import tool_path

    return tool_path(name)


def finish_row(name: str, arch: int, function: str, usage: dict, smem: int,
               threads: Optional[int], instrs: Sequence[Instr], source: str = "") -> dict:
    row = dict(kernel=name, arch=f"sm_{arch}a", function=function, source=source,
               registers=usage["registers"], stack=usage["stack"], local=usage["local"],
               spills=usage["stack"] + usage["local"], shared=smem, threads=threads)
    row.update(occupancy(arch, usage["registers"], smem, threads) if threads else
               dict(ctas_per_sm=None, limited_by="unknown block size"))
    row.update(analyze(instrs))
    return row


_EXPECT_TX = re.compile(r"mbarrier\.arrive\.expect_tx\S*\s+_,\s*\[[^\]]+\],\s*(\d+)")


def tma_tile_bytes(job: TritonJob) -> Optional[int]:
    """K + V bytes one block_attention tile moves by TMA (``KV_TMA`` builds), else None."""
    c = job.constexprs
    if not c.get("KV_TMA"):
        return None
    elt = 1 if "fp8" in job.signature["KD"] else 2
    return 2 * c["BLOCK_N"] * c["D"] * elt


def tma_prefetch_bytes(ptx: str) -> int:
    """Bytes the TMA copies issued before the first mbarrier wait announce
    (``expect_tx``): what is in flight when the first tile is consumed."""
    head = ptx.split("mbarrier.try_wait", 1)[0]
    return sum(int(m.group(1)) for m in _EXPECT_TX.finditer(head))


def _tma_main_loop(row: dict, job: TritonJob, ptx: str) -> None:
    """A TMA main loop's bytes (the SASS does not hold them: the descriptor
    does) and tiles in flight (cp.async's DEPBAR count says nothing of the
    mbarrier-tracked copies): per thread, the K + V tile over the CTA's
    threads; in flight, the tile bytes issued before the first wait over a
    tile's (K of the next tile without its V counts half)."""
    tile = tma_tile_bytes(job)
    if tile is None or row["main_loop"] is None:
        return
    lp = row["loops"][row["main_loop"]]
    if "TMA" not in lp["load_kinds"]:
        return
    lp["tma_tile_bytes"] = tile
    lp["load_bytes"] += tile // row["threads"]
    lp["instr_per_byte"] = round(lp["instructions"] / lp["load_bytes"], 2)
    lp["tiles_in_flight"] = tma_prefetch_bytes(ptx) / tile


def triton_kernels(archs: Sequence[int], out_dir: Optional[Path], select: Sequence[str] = (),
                   jobs: int = 2, cache_dir: Optional[Path] = None) -> List[dict]:
    """Compile the catalog for ``archs`` (names filtered by ``select`` prefixes) and analyze it."""
    work, names = [], []
    for arch in archs:
        for name, job in catalog(arch):
            if select and not any(name.startswith(s) for s in select):
                continue
            work.append((job, arch))
            names.append(name)
    compiled = compile_many(work, cache_dir=cache_dir, jobs=jobs)
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        texts = list(pool.map(sass_text, [res["cubin"] for res in compiled]))
    rows = []
    for name, (job, arch), res, text in zip(names, work, compiled, texts):
        funcs = parse_sass(text)
        instrs = next(iter(funcs.values()), [])
        if out_dir:
            dst = out_dir / f"sm_{arch}a"
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(res["cubin"], dst / f"{name}.cubin")
            (dst / f"{name}.sass").write_text(text)
            (dst / f"{name}.ptx").write_text(res["ptx"])
        # Dynamic shared memory of the launch plus the cubin's static (which holds the 1 KB reserve).
        smem = res["shared"] + res["shared_static"]
        row = finish_row(name, arch, res["function"], res, smem, job.num_warps * 32, instrs,
                         source=f"{job.module}.{job.kernel}")
        _tma_main_loop(row, job, res["ptx"])
        row.update(num_warps=job.num_warps, num_stages=job.num_stages,
                   ptx_file=res["cubin"][: -len(".cubin")] + ".ptx")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def _loads_text(kinds: dict) -> str:
    return " ".join(f"{n}x{k}" for k, n in sorted(kinds.items())) or "-"


def table(rows: Sequence[dict]) -> str:
    """One line per kernel and arch (its main loop), then one per further loop with loads."""
    head = ("kernel", "arch", "regs", "spill", "smem", "CTA/SM", "mma", "loop", "instr",
            "loads/iter (kind.bits per thread)", "B/iter", "instr/B", "in flight", "bar")
    lines = []
    for r in rows:
        loops = r["loops"]
        order = ([r["main_loop"]] if r["main_loop"] is not None else []) + \
            [i for i, lp in enumerate(loops) if lp["loads"] and i != r["main_loop"]]
        base = (r["kernel"], r["arch"].replace("sm_", ""), str(r["registers"]), str(r["spills"]),
                f"{r['shared'] / 1024:.1f}K", str(r["ctas_per_sm"]), ",".join(r["mma"]) or "-")
        if not order:
            lines.append(base + ("-",) * 7)
        for n, i in enumerate(order):
            lp = loops[i]
            tag = ("main" if n == 0 else "loop") + f"@{lp['start']:x}"
            tag += f" d{lp['depth']}" if lp["depth"] else ""
            cells = (tag, str(lp["instructions"]), _loads_text(lp["load_kinds"]), str(lp["load_bytes"]),
                     str(lp["instr_per_byte"] if lp["instr_per_byte"] is not None else "-"),
                     str(lp["tiles_in_flight"] if lp["tiles_in_flight"] is not None else "-"),
                     str(lp["barriers"]))
            lines.append((base if n == 0 else ("", "") + ("",) * 5) + cells)
    widths = [max(len(h), *(len(l[c]) for l in lines)) if lines else len(h) for c, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(l) for l in lines])


def report(archs: Sequence[int] = (90, 100), select: Sequence[str] = (), out_dir=None,
           include_cuda: bool = True, jobs: int = 2, cache_dir=None) -> List[dict]:
    """Every row: the Triton catalog, then the extension's kernels.

    ``select``: name prefixes to keep (``cuda...`` ones select the extension's
    kernels, the others the Triton catalog's); empty keeps everything.
    """
    out = Path(out_dir) if out_dir else None
    tri_sel = [k for k in select if not k.startswith("cuda")]
    cuda_sel = [k for k in select if k.startswith("cuda")]
    rows = []
    if tri_sel or not select:
        rows += triton_kernels(archs, out, tri_sel, jobs=jobs, cache_dir=cache_dir)
    if include_cuda and (cuda_sel or not select):
        rows += [r for r in cuda_kernels(archs, out)
                 if not cuda_sel or any(r["kernel"].startswith(k) for k in cuda_sel)]
    return rows


def _arch_list(text: str) -> List[int]:
    vals = []
    for x in text.split(","):
        x = x.strip().lower().removeprefix("sm_").rstrip("a")
        if x not in ("90", "100"):
            raise argparse.ArgumentTypeError(f"--arch: expected 90a and/or 100a, got {text!r}")
        vals.append(int(x))
    return vals


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m microbench sass",
                                description="Compile report: registers, spills, shared memory, "
                                            "CTAs/SM and the main loops' loads of every kernel "
                                            "(no GPU needed). See docs/benchmark.md.")
    p.add_argument("--arch", type=_arch_list, default=[90, 100], help="comma-separated: 90a,100a")
    p.add_argument("--json", metavar="F", help="write every row (loops included) as JSON")
    p.add_argument("--out", metavar="DIR", help="write each kernel's cubin, SASS (and PTX) here")
    p.add_argument("--kernel", nargs="+", default=[], metavar="NAME",
                   help="only kernels whose name starts with NAME (e.g. block_attention, "
                        "verify_chain.rows, cuda)")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA extension's kernels")
    p.add_argument("--jobs", type=int, default=2, help="compile subprocesses side by side")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    rows = report(args.arch, args.kernel, args.out, not args.no_cuda, args.jobs)
    if not rows:
        names = sorted({n for a in args.arch for n, _ in catalog(a)})
        print(f"python -m microbench sass: error: --kernel {' '.join(args.kernel)} matches no kernel; "
              f"names: {', '.join(names)}, cuda...", file=sys.stderr)
        return 2
    import triton

    print(f"compile report, Triton {triton.__version__}, "
          f"{datetime.date.today().isoformat()} (no GPU: SASS facts, not timings)")
    print(table(rows))
    if args.json:
        meta = dict(created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    triton=triton.__version__, limits={f"sm_{a}a": LIMITS[a] for a in args.arch})
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
