"""Minimum bytes each op must move, and the bandwidth arithmetic of a row.

The minimum counts every input the op needs read once and every output
written once, in the tensors' storage dtypes, nothing else (no re-reads, no
intermediates, no partially used pages). So ``bytes / time`` is a lower bound
of the DRAM traffic rate, and ``bytes / copy_bandwidth`` is the time an ideal
kernel would need if it streamed at the speed of a device-to-device copy.

Units: bytes, seconds, GB/s with 1 GB = 1e9 bytes.
"""

from __future__ import annotations

import math

I32, I64, F32 = 4, 8, 4


def attention_bytes(*, batch, s, hq, hkv, d, ctx, page, act, cache_elt, window=0, lse=False,
                    fp8_scales=False, mask_bits=False):
    """block_attention with the block keys passed in (k_block / v_block).

    Every request has ``ctx`` context tokens; with a window W only the last
    ``min(ctx, W - 1)`` of them are visible to the block (the first query sits
    at position ctx), and only those keys, values and page-table entries count.

    q, out:            batch * s * hq * d * act           (each)
    context K and V:   2 * batch * visible * hkv * d * cache_elt
    block K and V:     2 * batch * s * hkv * d * act
    block table:       batch * ceil(visible / page) * 4   (int32)
    context_lens:      batch * 4
    lse (optional):    batch * s * hq * 4
    fp8 scales:        2 * 4
    mask_bits:         batch * s * ceil(s / 32) * 4   (a packed tree block_mask, int32)
    """
    visible = ctx if window <= 0 else min(ctx, window - 1)
    q = batch * s * hq * d * act
    kv_ctx = 2 * batch * visible * hkv * d * cache_elt
    kv_block = 2 * batch * s * hkv * d * act
    table = batch * math.ceil(visible / page) * I32 + batch * I32
    out = batch * s * hq * d * act + (batch * s * hq * F32 if lse else 0)
    mask = batch * s * math.ceil(s / 32) * I32 if mask_bits else 0
    return q + kv_ctx + kv_block + table + out + (2 * F32 if fp8_scales else 0) + mask


def fuse_bytes(*, n, h, k, act, norm_elt):
    """fuse_target_features: features [n, k*h], fc_weight [h, k*h], norm_weight [h], out [n, h]."""
    return n * k * h * act + h * k * h * act + h * norm_elt + n * h * act


def write_kv_bytes(*, n, n_valid, layers, hkv, d, act, cache_elt, rotary_dim, norm_elt,
                   k_norm=True, fp8_scales=False):
    """write_kv over a dense [n] token layout of which ``n_valid`` have a slot >= 0.

    slot_mapping is read for all n tokens (int64); everything per token is
    needed only for the valid ones: k and v rows (n_valid * layers * hkv * d
    each), positions (int64), the cos/sin row (rotary_dim fp32), and the
    cache writes (2 * n_valid * layers * hkv * d * cache_elt). k_norm_weight
    [layers, d] is read once.
    """
    per_tok = 2 * layers * hkv * d
    return (n * I64 + n_valid * (per_tok * act + I64 + rotary_dim * F32 + per_tok * cache_elt)
            + (layers * d * norm_elt if k_norm else 0) + (2 * F32 if fp8_scales else 0))


def inject_kv_bytes(*, n, n_valid, h, layers, hkv, d, act, cache_elt, rotary_dim, norm_elt,
                    k_norm=True, fp8_scales=False):
    """inject_kv: write_kv's traffic, with hidden rows [n_valid, h] read instead of
    k and v, plus the projection weight kv_weight [layers, 2, hkv*d, h]."""
    per_tok = 2 * layers * hkv * d
    return (n * I64 + n_valid * (h * act + I64 + rotary_dim * F32 + per_tok * cache_elt)
            + layers * 2 * hkv * d * h * act
            + (layers * d * norm_elt if k_norm else 0) + (2 * F32 if fp8_scales else 0))


def injection_bytes(*, n, n_valid, h, k, layers, hkv, d, act, cache_elt, rotary_dim, norm_elt,
                    fp8_scales=False):
    """The whole injection step as two ops: fuse_target_features over the n rows,
    then inject_kv (the hidden [n, h] is written by the first and read by the second)."""
    return (fuse_bytes(n=n, h=h, k=k, act=act, norm_elt=norm_elt)
            + inject_kv_bytes(n=n, n_valid=n_valid, h=h, layers=layers, hkv=hkv, d=d, act=act,
                              cache_elt=cache_elt, rotary_dim=rotary_dim, norm_elt=norm_elt,
                              fp8_scales=fp8_scales))


def verify_bytes(*, batch, s, v, logits_elt, token_elt, sampled=False, seq_lens=False):
    """verify_chain, point-mass drafts.

    logits [batch, s, v] (every row read once), block_tokens [batch, s],
    num_drafts int32 [batch]; writes accept_len, bonus int32 [batch] and
    out_tokens int32 [batch, s]. Sampled: temperature fp32, seeds and
    positions int64 per request. seq_lens: int32 read and new_seq_lens written.
    """
    total = batch * s * v * logits_elt + batch * s * token_elt + batch * I32
    total += batch * I32 * 2 + batch * s * I32
    if sampled:
        total += batch * (F32 + 2 * I64)
    if seq_lens:
        total += 2 * batch * I32
    return total


def copy_bytes(nbytes):
    """Bytes moved by a device-to-device copy of ``nbytes``: read once, written once."""
    return 2 * nbytes


def gbps(nbytes, seconds):
    """Achieved bandwidth in GB/s (1e9 bytes per second)."""
    if not seconds or seconds <= 0:
        return None
    return nbytes / seconds / 1e9


def fraction(achieved_gbps, copy_gbps):
    """Achieved bandwidth as a fraction of the measured copy bandwidth."""
    if achieved_gbps is None or not copy_gbps:
        return None
    return achieved_gbps / copy_gbps


def speedup(baseline_seconds, seconds):
    """How many times faster than the baseline (> 1: faster)."""
    if not baseline_seconds or not seconds:
        return None
    return baseline_seconds / seconds


def tree_mask_bytes(*, batch, n):
    """tree_mask: parents int32 [batch, n] read; mask int32 [batch, n, ceil(n/32)] and
    depth int32 [batch, n] written."""
    return batch * n * I32 + batch * n * math.ceil(n / 32) * I32 + batch * n * I32


def verify_tree_bytes(*, batch, n, v, logits_elt, token_elt, sampled=False, seq_lens=False):
    """verify_tree over n node rows: logits [batch, n, v] read once, tree_tokens [batch, n],
    parents int32 [batch, n]; writes accept_len, bonus int32 [batch] and accepted_nodes,
    out_tokens int32 [batch, n]. Sampled and seq_lens as :func:`verify_bytes`."""
    total = batch * n * v * logits_elt + batch * n * (token_elt + I32)
    total += 2 * batch * I32 + 2 * batch * n * I32
    if sampled:
        total += batch * (F32 + 2 * I64)
    if seq_lens:
        total += 2 * batch * I32
    return total


def copy_kv_bytes(*, m, kept, layers, hkv, d, cache_elt):
    """copy_kv of m (src, dst) int64 pairs of which ``kept`` have a destination: every kept
    row of every layer's K and V read once and written once."""
    return 2 * m * I64 + 2 * kept * layers * 2 * hkv * d * cache_elt


def build_tree_bytes(*, batch, d, v, n, logits_elt):
    """build_tree over d = S-1 draft rows: draft_logits [batch, d, v] read once; writes
    tree_tokens int64, parents and depth int32 [batch, n] and num_nodes int32 [batch].
    The per-split candidate keys and row statistics between the two launches
    (batch * d * splits * (8 * top_k + 12) bytes, written and read once) are left out."""
    return batch * d * v * logits_elt + batch * n * (I64 + 2 * I32) + batch * I32
