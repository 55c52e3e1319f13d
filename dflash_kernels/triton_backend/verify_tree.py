"""verify_tree in Triton: two launches, no host synchronisation.

Launch 1 is verify_chain's row pass (:func:`.verify_chain.rows_pass`): a tree
node row is a chain row, streamed once (greedy argmax, or the keyed
Gumbel-max with top-k / top-p), except that a sampled row's noise is keyed by
``positions[b] + depth(i) + 1``; each row program finds ``depth(i)`` itself by
walking the parent links (at most ``depth`` int32 loads, L2 hits), so no
depth launch is needed.

Launch 2, grid ``(B,)``: one program per request holds its N parents and
tokens in registers, marks the used slots (a prefix scan), and walks from the
root: reduce the current row's split partials to its target token, move to
the lowest used child carrying that token, until none does (``accept_len + 1``
steps); then writes accept_len / accepted_nodes / out_tokens / bonus /
new_seq_lens. See docs/tree.md.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._launch import launch
from ._common import next_pow2, on_device

from . import verify_chain as vc


@triton.jit
def _verify_tree_walk_kernel(
    tok_ptr, par_ptr, nn_ptr, seq_ptr, pval_ptr, pidx_ptr,
    acc_ptr, nodes_ptr, out_ptr, bonus_ptr, nsl_ptr, N, V, NSPLIT,
    HAS_NN: tl.constexpr, HAS_SEQ: tl.constexpr, NSPLIT_P2: tl.constexpr, N_P2: tl.constexpr,
):
    b = tl.program_id(0)
    i = tl.arange(0, N_P2)
    in_n = i < N
    row = b.to(tl.int64) * N
    par = tl.load(par_ptr + row + i, mask=in_n, other=-1)
    tok = tl.load(tok_ptr + row + i, mask=in_n, other=-1).to(tl.int64)
    # Used slots: the prefix before the first slot whose parent is not in [0, slot).
    bad = ((i > 0) & ((par < 0) | (par >= i))) | (i >= N)
    used = tl.cumsum(bad.to(tl.int32), axis=0) == 0
    if HAS_NN:
        used = used & (i < tl.maximum(tl.load(nn_ptr + b), 1))

    cur = b * 0
    a = b * 0
    alive = a == 0
    path = tl.full((N_P2,), -1, tl.int32)
    path_tok = tl.full((N_P2,), -1, tl.int32)
    while alive:
        t_cur = vc._reduce_token(pval_ptr, pidx_ptr, b * N + cur, NSPLIT, NSPLIT_P2)
        cand = used & (par == cur) & (tok == t_cur.to(tl.int64))
        c = tl.min(tl.where(cand, i, N_P2), axis=0)
        alive = c < N
        at = alive & (i == a)
        path = tl.where(at, c, path)
        path_tok = tl.where(at, t_cur, path_tok)
        cur = tl.where(alive, c, cur)
        a += alive.to(tl.int32)
    bonus = vc._reduce_token(pval_ptr, pidx_ptr, b * N + cur, NSPLIT, NSPLIT_P2)
    bonus = tl.minimum(tl.maximum(bonus, 0), V - 1)
    toks = tl.where(i < a, path_tok, tl.where(i == a, bonus, -1))
    tl.store(nodes_ptr + row + i, path, mask=in_n)
    tl.store(out_ptr + row + i, toks, mask=in_n)
    tl.store(acc_ptr + b, a)
    tl.store(bonus_ptr + b, bonus)
    if HAS_SEQ:
        tl.store(nsl_ptr + b, tl.load(seq_ptr + b) + a + 1)


def verify_tree(logits, tree_tokens, parents, num_nodes, temperature, top_k, top_p, seeds,
                positions, seq_lens, accept_len, accepted_nodes, out_tokens, bonus,
                new_seq_lens) -> None:
    """Writes accept_len / accepted_nodes / out_tokens / bonus / new_seq_lens (docs/tree.md).

    logits ``[B, N, V]``; tree_tokens int32/int64 ``[B, N]`` and parents int32
    ``[B, N]`` dense (ops hands them over so); num_nodes int32 ``[B]`` or None.
    """
    B, N, V = logits.shape
    dev = logits.device
    with on_device(dev):
        rp = vc.rows_pass(logits, temperature, top_k, top_p, seeds, positions, parents=parents)
        dummy = rp["dummy"]
        launch(_verify_tree_walk_kernel, (B,),
            tree_tokens, parents, num_nodes if num_nodes is not None else dummy,
            seq_lens if seq_lens is not None else dummy, rp["pval"], rp["pidx"],
            accept_len, accepted_nodes, out_tokens, bonus,
            new_seq_lens if new_seq_lens is not None else dummy, N, V, rp["nsplit"],
            HAS_NN=num_nodes is not None, HAS_SEQ=new_seq_lens is not None,
            NSPLIT_P2=next_pow2(rp["nsplit"]), N_P2=max(2, next_pow2(N)),
            num_warps=1)


def compile_spec(kernel: str, N: int = 64) -> dict:
    """Signature and constexprs of launch 1 (the row pass with the tree's depth walk, sampled
    with top-k and top-p, bf16 logits) or launch 2 (the walk) for N slots, for compile checks
    without a GPU (tests/triton_compile.py)."""
    if kernel == "_verify_rows_kernel":
        sig = dict(logits_ptr="*bf16", stride_lb="i64", stride_ls="i64", temp_ptr="*fp32",
                   topk_ptr="*i32", topp_ptr="*fp32", seed_ptr="*i64", pos_ptr="*i64",
                   pval_ptr="*fp32", pidx_ptr="*i32", pm_ptr="*fp32", pz_ptr="*fp32",
                   thr_ptr="*fp32", S="i32", V="i32", CHUNK="i32", NSPLIT="i32",
                   par_ptr="*i32", stride_pb="i32", NCOUNT="i32", NMASS="i32", ws_ptr="*bf16",
                   ctr_ptr="*i32")
        const = dict(HAS_TEMP=True, HAS_TOPK=True, HAS_TOPP=True, NEED_MZ=False,
                     BLOCK=vc.BLOCK_V, SBLOCK=vc.SEARCH_BLOCK_V, KWAY=vc.KWAY, HAS_TREE=True,
                     PRUNE=vc.PRUNE, RAGGED=False, cu_ptr=None, T=1, JOINT=False,
                     SEARCH_SPLIT=False, st_ptr=None, cnt_ptr=None, mx_ptr=None, pst_ptr=None,
                     pms_ptr=None, pzf_ptr=None, NSPLIT_P2=1, KEYDT=vc.key_space(torch.bfloat16),
                     CAP=vc.COMPACT_CAP, **vc.UNFOLDED)
        warps = 4
    elif kernel == "_verify_tree_walk_kernel":
        sig = dict(tok_ptr="*i64", par_ptr="*i32", nn_ptr="*i32", seq_ptr="*i32",
                   pval_ptr="*fp32", pidx_ptr="*i32", acc_ptr="*i32", nodes_ptr="*i32",
                   out_ptr="*i32", bonus_ptr="*i32", nsl_ptr="*i32", N="i32", V="i32",
                   NSPLIT="i32")
        const = dict(HAS_NN=True, HAS_SEQ=True, NSPLIT_P2=64, N_P2=next_pow2(N))
        warps = 1
    else:
        raise ValueError(f"kernel: unknown {kernel!r}")
    sig.update({n: "constexpr" for n in const})
    return dict(signature=sig, constexprs=const, num_warps=warps, num_stages=2)
