"""write_kv on the compiled kernel: K norm, RoPE, fp8 quantization and the paged scatter."""

from __future__ import annotations

from . import IMPL

UNSUPPORTED_ARGS = frozenset()

# The extension's binding called without the dispatcher (csrc/bindings/direct.cpp;
# torch.ops.dflash.write_kv_cuda runs the same host path), or the NVRTC path.
if IMPL == "extension":
    from .. import _C

    _op = _C.write_kv_cuda
else:
    from ._jit import write_kv as _op


def write_kv(k, v, k_norm_weight, positions, slot_mapping, k_caches, v_caches, cos_sin_cache,
             eps, rope_neox, rotary_dim, k_scale, v_scale) -> None:
    """k, v ``[N, L, Hkv, D]`` fp16/bf16 into L paged caches ``[P, page, Hkv, D]``
    (lists); dense int64 positions / slot_mapping; fp32 1-element scales for fp8."""
    _op(k, v, k_norm_weight, positions, slot_mapping, k_caches, v_caches, cos_sin_cache, eps,
        rope_neox, rotary_dim, k_scale, v_scale)
