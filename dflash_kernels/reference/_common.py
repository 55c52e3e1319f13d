"""What the reference KV-injection ops share: fp32 RMSNorm, RoPE, rounding to
the cache dtype and the paged-cache scatter (SPEC.md, docs/DESIGN.md).

All math is fp32: the GEMMs accumulate in fp32, the fp32 result goes through
bias, RMSNorm and RoPE without intermediate rounding, and is rounded once, to
the cache dtype (or quantized to fp8 with the scale). Runs on any device and
never reads a device value on the host: rows not written (slot outside the
cache, or a later token with the same slot: docs/DESIGN.md, "Edge values")
are neutralised with masks of host-known size, not by branching.
"""

from __future__ import annotations

import torch

from .._dtypes import FP8_MAX

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def rms_norm(x: torch.Tensor, weight, eps: float) -> torch.Tensor:
    """fp32 ``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim."""
    x = x.float()
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.float()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
               rotary_dim: int, neox: bool) -> torch.Tensor:
    """RoPE on fp32 ``x [N, ..., D]`` at int64 ``positions [N]``.

    ``cos_sin_cache [max_pos, rotary_dim]``: cos in the first half, sin in the
    second. neox rotates the pairs (j, j + rotary_dim/2), gptj the pairs
    (2j, 2j+1), both with frequency index j; dims >= rotary_dim pass through.
    """
    half = rotary_dim // 2
    cs = cos_sin_cache.float()[positions]                       # [N, rotary_dim]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = cs[:, :half].reshape(shape), cs[:, half:].reshape(shape)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if neox:
        x1, x2 = rot[..., :half], rot[..., half:]
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if neox:
        rot = torch.cat([o1, o2], dim=-1)
    else:
        rot = torch.stack([o1, o2], dim=-1).flatten(-2)
    return torch.cat([rot, rest], dim=-1)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale) -> torch.Tensor:
    """Round fp32 ``x`` to the cache dtype; fp8: ``sat(x / scale)``, round to nearest even."""
    if dtype in FP8_MAX:
        m = FP8_MAX[dtype]
        return (x / scale.float().reshape(())).clamp(-m, m).to(dtype)
    return x.to(dtype)


def written_rows(slot_mapping: torch.Tensor, num_slots: int) -> torch.Tensor:
    """bool ``[N]``: the tokens whose row is stored (docs/DESIGN.md, "Edge values").

    A slot outside ``[0, num_slots)`` is skipped; among tokens sharing a valid
    slot the last one (highest index) wins. A stable sort puts each slot's
    tokens in index order, so the winner is the one whose sorted successor
    holds another slot: O(N log N), no host read, no data-dependent shape.
    """
    N = slot_mapping.shape[0]
    ok = (slot_mapping >= 0) & (slot_mapping < num_slots)
    key = torch.where(ok, slot_mapping, torch.full_like(slot_mapping, -1))
    sk, idx = torch.sort(key, stable=True)
    last = torch.ones(N, dtype=torch.bool, device=key.device)
    last[:-1] = sk[:-1] != sk[1:]
    return ok & torch.zeros_like(last).scatter(0, idx, last)


def scatter_rows(cache: torch.Tensor, slot_mapping: torch.Tensor, valid: torch.Tensor,
                 values: torch.Tensor) -> None:
    """``cache[slot // page, slot % page] = values[t]`` for every t with ``valid[t]``
    (:func:`written_rows`: its slot is in the cache and no later token has it).

    ``cache``: ``[P, page, Hkv, D]`` with any strides; ``values``: ``[N, Hkv, D]``
    in the cache dtype. The writes go through ``index_put_`` on the cache view.
    Every row is written somewhere (no host-side selection): a row not
    written is redirected to the slot of the first valid row and carries
    that row's value, so duplicate indices always carry identical bits; with no
    valid row at all, every row rewrites slot 0 with its own old bits. The
    copies are made on integer views, so NaN payloads survive bit for bit.
    """
    N = slot_mapping.shape[0]
    if N == 0 or cache.numel() == 0:
        return
    page_size = cache.shape[1]
    idt = _INT_VIEW[cache.element_size()]
    icache = cache.view(idt)
    ivals = values.reshape(N, *cache.shape[2:]).view(idt)
    first = torch.argmax(valid.to(torch.int32))                  # first valid row, or 0
    any_valid = valid[first]
    fallback_slot = torch.where(any_valid, slot_mapping[first], torch.zeros_like(slot_mapping[first]))
    slots = torch.where(valid, slot_mapping, fallback_slot)
    page, row = slots // page_size, slots % page_size
    old0 = icache[0, 0]
    fallback_val = torch.where(any_valid, ivals[first], old0)
    vals = torch.where(valid.view(N, 1, 1), ivals, fallback_val.unsqueeze(0))
    icache.index_put_((page, row), vals)


def per_layer(caches) -> list:
    """The backend interface's cache list as L per-layer caches: a list of one
    stacked ``[L, P, page, Hkv, D]`` cache is its L layers."""
    if len(caches) == 1 and caches[0].dim() == 5:
        return list(caches[0].unbind(0))
    return list(caches)


def write_layers(k_all, v_all, k_norm_weight, positions, slot_mapping, k_caches, v_caches,
                 cos_sin_cache, eps, rope_neox, rotary_dim, k_scale, v_scale):
    """k_all, v_all: fp32 ``[N, L, Hkv, D]`` before norm / RoPE."""
    k_caches, v_caches = per_layer(k_caches), per_layer(v_caches)
    # Positions outside the table are clamped into it (not wrapped); skipped rows
    # (padding) may carry any position. Slots: written_rows.
    positions = positions.clamp(0, max(cos_sin_cache.shape[0] - 1, 0))
    kc0 = k_caches[0]
    valid = written_rows(slot_mapping, kc0.shape[0] * kc0.shape[1])
    for layer, (kc, vc) in enumerate(zip(k_caches, v_caches)):
        k = k_all[:, layer]
        if k_norm_weight is not None:
            k = rms_norm(k, k_norm_weight[layer], eps)
        k = apply_rope(k, positions, cos_sin_cache, rotary_dim, rope_neox)
        scatter_rows(kc, slot_mapping, valid, to_cache_dtype(k, kc.dtype, k_scale))
        scatter_rows(vc, slot_mapping, valid, to_cache_dtype(v_all[:, layer], vc.dtype, v_scale))
