"""PyTorch reference of ``norm_rope`` (SPEC.md "norm_rope"): the draft block's
q and k, per head RMSNorm (when a weight is given) then RoPE, in fp32, one
rounding back to the input dtype, written in place. The math is inject_kv's K
epilogue (``_common.rms_norm``, ``_common.apply_rope``)."""

from __future__ import annotations

from ._common import apply_rope, rms_norm


def norm_rope(q, k, positions, cos_sin_cache, q_norm_weight, k_norm_weight, eps: float,
              rope_neox: bool, rotary_dim: int) -> None:
    """q ``[N, Hq, D]``, k ``[N, Hkv, D]`` fp16/bf16 (unit last stride), positions
    int64 ``[N]``, weights ``[D]`` or None; q and k are overwritten."""
    # Positions outside the table are clamped into it, as write_kv does.
    positions = positions.clamp(0, max(cos_sin_cache.shape[0] - 1, 0))
    for x, w in ((q, q_norm_weight), (k, k_norm_weight)):
        y = rms_norm(x, w, eps) if w is not None else x.float()
        x.copy_(apply_rope(y, positions, cos_sin_cache, rotary_dim, rope_neox).to(x.dtype))
