"""PyTorch reference of ``write_kv`` (SPEC.md, docs/DESIGN.md): fp32 math,
one rounding to the cache dtype, no host reads of device values."""

from __future__ import annotations

from ._common import write_layers


def write_kv(k, v, k_norm_weight, positions, slot_mapping, k_caches: list, v_caches: list,
             cos_sin_cache, eps: float, rope_neox: bool, rotary_dim: int, k_scale, v_scale) -> None:
    """:func:`~dflash_kernels.reference.inject_kv.inject_kv` from projected
    ``k, v [N, L, Hkv, D]``: K norm + RoPE, then the L paged caches at ``slot_mapping``."""
    write_layers(k.float(), v.float(), k_norm_weight, positions, slot_mapping, k_caches, v_caches,
                 cos_sin_cache, eps, rope_neox, rotary_dim, k_scale, v_scale)
