"""tree_mask in Triton: one launch, grid ``(B,)``, no host synchronisation.

One program per request holds its N parents in registers, marks the used
slots (a prefix scan: the first slot whose parent is not in ``[0, slot)``
ends them), and walks every used slot up to the root at once: a vector of
N current nodes advances one parent link per iteration (a gather from the
request's parent row, L1 hits), OR-ing each visited node's bit into an
``[N, ceil(N/32)]`` word tile; the depth is the iteration count. The loop
runs max-depth times. Unused slots see only themselves, depth 0.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._launch import launch
from ._common import next_pow2, on_device


@triton.jit
def _tree_mask_kernel(par_ptr, mask_ptr, depth_ptr, N, W,
                      N_P2: tl.constexpr, W_P2: tl.constexpr):
    b = tl.program_id(0)
    i = tl.arange(0, N_P2)
    w = tl.arange(0, W_P2)
    in_n = i < N
    prow = par_ptr + b.to(tl.int64) * N
    par = tl.load(prow + i, mask=in_n, other=-1)
    bad = ((i > 0) & ((par < 0) | (par >= i))) | (i >= N)
    used = tl.cumsum(bad.to(tl.int32), axis=0) == 0
    one = tl.full((N_P2, W_P2), 1, tl.int32)
    # Self bit: word i // 32, bit i % 32 (bit 31 is the int32 sign bit).
    words = tl.where(w[None, :] == (i // 32)[:, None], one << (i % 32)[:, None], 0)
    node = tl.where(used, i, 0)
    depth = tl.zeros((N_P2,), tl.int32)
    while tl.max(node, axis=0) > 0:
        active = node > 0
        # A used slot's ancestors are used with parents below them: node only decreases.
        node = tl.where(active, tl.load(prow + node, mask=active, other=0), 0)
        node = tl.maximum(node, 0)
        depth += active.to(tl.int32)
        hit = active[:, None] & (w[None, :] == (node // 32)[:, None])
        words = words | tl.where(hit, one << (node % 32)[:, None], 0)
    out = mask_ptr + (b.to(tl.int64) * N + i[:, None]) * W + w[None, :]
    tl.store(out, words, mask=in_n[:, None] & (w[None, :] < W))
    tl.store(depth_ptr + b.to(tl.int64) * N + i, depth, mask=in_n)


def tree_mask(parents, mask, depth) -> None:
    """Writes ``mask`` int32 ``[B, N, ceil(N/32)]`` and ``depth`` int32 ``[B, N]`` (contiguous).

    ``parents``: int32 ``[B, N]``, dense (ops hands it over so).
    """
    B, N = parents.shape
    if B == 0:
        return
    W = mask.shape[2]
    dev = parents.device
    with on_device(dev):
        launch(_tree_mask_kernel, (B,), parents, mask, depth, N, W,
                                N_P2=max(2, next_pow2(N)),
                                W_P2=max(1, next_pow2(W)),
                                num_warps=4 if N <= 128 else 8)


def compile_spec(N: int = 256) -> dict:
    """Signature and constexprs of the launch for N slots (compile checks without a GPU)."""
    W = (N + 31) // 32
    const = dict(N_P2=next_pow2(N), W_P2=next_pow2(W))
    sig = dict(par_ptr="*i32", mask_ptr="*i32", depth_ptr="*i32", N="i32", W="i32",
               **{n: "constexpr" for n in const})
    return dict(signature=sig, constexprs=const, num_warps=4 if N <= 128 else 8, num_stages=2)
