"""PyTorch reference of ``fuse_target_features`` (SPEC.md, docs/DESIGN.md)."""

from __future__ import annotations

from ._common import rms_norm


def fuse_target_features(features: list, fc_weight, norm_weight, eps: float, out) -> None:
    """``out [N, H] = rms_norm(sum_i f_i @ W[:, off_i:off_i+w_i].T) * norm_weight``.

    ``features``: list of ``[N, w_i]`` (fp16/bf16) whose widths add up to
    ``fc_weight.shape[1]``; no concatenation is made. fp32 accumulation, one
    rounding to ``out.dtype``.
    """
    acc = None
    off = 0
    for f in features:
        w = f.shape[1]
        part = f.float() @ fc_weight[:, off:off + w].float().T
        acc = part if acc is None else acc + part
        off += w
    out.copy_(rms_norm(acc, norm_weight, eps).to(out.dtype))
