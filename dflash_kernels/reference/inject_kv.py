"""PyTorch reference of ``inject_kv`` (SPEC.md, docs/DESIGN.md): fp32 math,
one rounding to the cache dtype, no host reads of device values."""

from __future__ import annotations

import torch

from ._common import write_layers


def inject_kv(hidden, kv_weight, kv_bias, k_norm_weight, positions, slot_mapping,
              k_caches: list, v_caches: list, cos_sin_cache, eps: float, rope_neox: bool,
              rotary_dim: int, k_scale, v_scale) -> None:
    """Project ``hidden [N, H]`` by ``kv_weight [L, 2, Hkv*D, H]`` (+ ``kv_bias``),
    K norm + RoPE, and write into the L paged caches at ``slot_mapping``."""
    N = hidden.shape[0]
    L = kv_weight.shape[0]
    Hkv, D = k_caches[0].shape[-2], k_caches[0].shape[-1]
    proj = torch.einsum("nh,ljoh->nljo", hidden.float(), kv_weight.float())   # [N, L, 2, Hkv*D]
    if kv_bias is not None:
        proj = proj + kv_bias.float().unsqueeze(0)
    proj = proj.reshape(N, L, 2, Hkv, D)
    write_layers(proj[:, :, 0], proj[:, :, 1], k_norm_weight, positions, slot_mapping,
                 k_caches, v_caches, cos_sin_cache, eps, rope_neox, rotary_dim, k_scale, v_scale)
