"""Triton ``fuse_target_features`` (SPEC.md, docs/DESIGN.md, docs/inject.md): two
launches, a split-K GEMM over the list of feature parts writing fp32 partial
rows, then a row kernel that sums the splits, takes the RMS over the full row
and writes the normalised output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._common import arch, arch_family, cdiv, next_pow2, num_sms, on_device, TL_DTYPES
from ._common import compile_spec as _spec

# Parts per launch (tuple arguments; each count compiles its own kernel); more are joined.
MAX_FEATURE_PARTS = 8
# SMs assumed without a GPU: small, so that the interpreter tests exercise split-K.
_CPU_SMS = 4

# GEMM: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by arch family (a
# table, not autotuning: the interpreter and CUDA-graph capture never benchmark).
CONFIGS = {
    "sm90": (64, 128, 64, 4, 4),
    "sm100": (64, 128, 64, 4, 4),
    "default": (32, 64, 64, 4, 3),
    "interp": (16, 32, 32, 4, 1),
}
_NORM_BLOCK_H = {"sm90": 1024, "sm100": 1024, "default": 1024, "interp": 64}


@triton.jit
def _fuse_part(acc, f_ptr, stride_f, width, col_off, t_start, t_count, tile_lo, tile_hi,
               w_ptr, stride_w, rows, cols, N, H, BLOCK_K: tl.constexpr):
    """acc += f[rows, k] @ W[cols, col_off + k].T over this split's K tiles of one part."""
    lo = tl.maximum(tile_lo, t_start) - t_start
    hi = tl.minimum(tile_hi, t_start + t_count) - t_start
    f_rows = f_ptr + rows.to(tl.int64)[:, None] * stride_f
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w + col_off
    row_in = rows < N
    col_in = cols < H
    for kt in range(lo, hi):
        k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        k_in = k < width
        x = tl.load(f_rows + k[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None], mask=col_in[None, :] & k_in[:, None], other=0.0)
        acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def _fuse_gemm_kernel(
    parts, part_strides, widths, starts, w_ptr, stride_w, ws_ptr, N, H, tiles_per_split,
    NUM_PARTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """ws[split, N, H] (fp32) = this split's share of sum_i f_i @ W[:, off_i:off_i+w_i].T.

    ``parts``, ``part_strides``, ``widths``, ``starts``: tuples of NUM_PARTS (the
    feature pointers, their row strides, widths and first K tiles). Part i owns
    the global K tiles [t_i, t_i + cdiv(w_i, BLOCK_K)) (each part padded to
    whole tiles); split s takes the tiles [s*T, (s+1)*T)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    lo = split * tiles_per_split
    hi = lo + tiles_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    off = 0
    for i in tl.static_range(NUM_PARTS):
        acc = _fuse_part(acc, parts[i], part_strides[i], widths[i], off, starts[i],
                         tl.cdiv(widths[i], BLOCK_K), lo, hi, w_ptr, stride_w, rows, cols, N, H,
                         BLOCK_K)
        off += widths[i]
    ws = ws_ptr + split.to(tl.int64) * N * H + rows.to(tl.int64)[:, None] * H + cols[None, :]
    tl.store(ws, acc, mask=(rows < N)[:, None] & (cols < H)[None, :])


@triton.jit
def _fuse_norm_kernel(ws_ptr, nw_ptr, out_ptr, stride_out, N, H, num_splits, eps,
                      BLOCK_H: tl.constexpr):
    """out[row] = rms_norm(sum over splits of ws[:, row]) * nw, one program per row."""
    row = tl.program_id(0).to(tl.int64)
    ss = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        c = h0 + tl.arange(0, BLOCK_H)
        y = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for s in range(num_splits):
            y += tl.load(ws_ptr + (s * N + row) * H + c, mask=c < H, other=0.0)
        ss += y * y
    r = tl.rsqrt(tl.sum(ss, axis=0) / H + eps)
    for h0 in range(0, H, BLOCK_H):
        c = h0 + tl.arange(0, BLOCK_H)
        y = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for s in range(num_splits):
            y += tl.load(ws_ptr + (s * N + row) * H + c, mask=c < H, other=0.0)
        w = tl.load(nw_ptr + c, mask=c < H, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + c, (y * r * w).to(out_ptr.dtype.element_ty), mask=c < H)


# Resident GEMM CTAs per SM (the compile report: 64x128x64, 4 stages, ~96 KB of shared
# memory per CTA on sm_90a / sm_100a; tests/test_compile_report.py asserts >= 2).
_GEMM_CTAS_PER_SM = 2


def _fuse_split(m_tiles: int, n_tiles: int, k_tiles: int, device) -> int:
    """Split K so the grid fills the resident CTA slots (SMs x CTAs per SM) in one wave
    without passing it (N 16, H 4096: 32 tiles x 8 splits = 256 CTAs on 264 slots of an
    H200, not 288 = 1.09 waves), keeping >= 4 K tiles per split."""
    slots = _GEMM_CTAS_PER_SM * (num_sms(device) or _CPU_SMS)
    return max(1, min(slots // (m_tiles * n_tiles), k_tiles // 4, 16))


def fuse_target_features(features: list, fc_weight, norm_weight, eps: float, out) -> None:
    """See the reference. Two launches: split-K GEMM into fp32 partials, then row RMSNorm."""
    parts = list(features)
    if len(parts) > MAX_FEATURE_PARTS:
        # Rare (more captured layers than one launch takes): join the tail parts.
        parts = parts[:MAX_FEATURE_PARTS - 1] + [torch.cat(parts[MAX_FEATURE_PARTS - 1:], 1)]
    for i, p in enumerate(parts):
        if p.stride(1) != 1:
            parts[i] = p.contiguous()
    if fc_weight.stride(1) != 1:
        fc_weight = fc_weight.contiguous()
    # Read at a unit stride; ops.py checks only its shape.
    norm_weight = norm_weight.contiguous()
    N, H = out.shape
    if N == 0 or H == 0:  # nothing to write (direct calls; ops.py returns before)
        return
    family = arch_family(arch(out.device))
    BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages = CONFIGS[family]
    widths = [p.shape[1] for p in parts]
    starts, t = [], 0
    for w in widths:
        starts.append(t)
        t += cdiv(w, BLOCK_K)
    k_tiles = t
    m_tiles, n_tiles = cdiv(N, BLOCK_M), cdiv(H, BLOCK_N)
    splits = _fuse_split(m_tiles, n_tiles, k_tiles, out.device)
    # At least one split of one tile: with zero-width features (K = 0) it stores zeros.
    tiles_per_split = max(1, cdiv(k_tiles, splits))
    splits = max(1, cdiv(k_tiles, tiles_per_split))
    ws = torch.empty((splits, N, H), dtype=torch.float32, device=out.device)
    block_h = min(_NORM_BLOCK_H[family], next_pow2(H))
    with on_device(out):
        launch(_fuse_gemm_kernel, (n_tiles, m_tiles, splits),
            tuple(parts), tuple(p.stride(0) for p in parts), tuple(widths), tuple(starts),
            fc_weight, fc_weight.stride(0), ws, N, H,
            tiles_per_split, NUM_PARTS=len(parts), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K, num_warps=num_warps, num_stages=num_stages)
        launch(_fuse_norm_kernel, (N,), ws, norm_weight, out, out.stride(0), N, H, splits, eps,
                                BLOCK_H=block_h, num_warps=4)


def compile_spec(arch: int, dtype) -> dict:
    """The GEMM's default launch on ``sm_{arch}`` with three parts, for the no-GPU
    compile checks and docs/inject.md, with the 16-divisibility of aligned shapes."""
    BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages = CONFIGS[arch_family(arch)]
    t = TL_DTYPES[dtype]
    parts = 3
    sig = {name: "i32" for name in _fuse_gemm_kernel.arg_names}
    sig.update(parts=(f"*{t}",) * parts, part_strides=("i32",) * parts, widths=("i32",) * parts,
               starts=("i32",) * parts, w_ptr=f"*{t}", ws_ptr="*fp32")
    ce = dict(NUM_PARTS=parts, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return _spec(_fuse_gemm_kernel, sig, ce, num_warps, num_stages, unaligned=("N",))
