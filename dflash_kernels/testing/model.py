"""A tiny Qwen3-style target model with its own paged KV cache, in plain PyTorch.

The target's attention is deliberately NOT one of the package's ops: it is the
independent side of the end-to-end tests. It runs in float64 by default, so
that a verify pass over S tokens and S one-token passes give logits that agree
far below fp32 rounding and argmax / Gumbel-max decisions practically never
flip between the speculative and the plain loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor


@dataclass
class TargetConfig:
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 256
    rope_theta: float = 10000.0
    max_position: int = 2048
    eps: float = 1e-6
    tie_embeddings: bool = False
    # Layers whose outputs (the residual stream after the layer) the drafter reads.
    capture_layers: Tuple[int, ...] = (1, 3)
    # Scale of the LM head: large enough that the next-token distribution is
    # peaked (sampled text is not uniform noise), small enough that sampling
    # still varies.
    logit_scale: float = 4.0
    seed: int = 0
    dtype: torch.dtype = torch.float64


def make_cos_sin_cache(max_position: int, rotary_dim: int, theta: float = 10000.0,
                       device=None) -> Tensor:
    """fp32 ``[max_position, rotary_dim]``: cos in the first half, sin in the second."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    freqs = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(torch.float32).to(device)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim, computed in (at least) fp32, returned in x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)
    return y.to(x.dtype)


def rope_neox(x: Tensor, positions: Tensor, cos_sin_cache: Tensor) -> Tensor:
    """Rotate halves of ``x [..., T, heads, D]`` at ``positions [..., T]`` (neox style)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache[positions].to(acc)  # [..., T, D]
    cos, sin = cs[..., None, :half], cs[..., None, half:]
    xf = x.to(acc)
    x1, x2 = xf[..., :half], xf[..., half:2 * half]
    rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, xf[..., 2 * half:]], dim=-1)
    return rot.to(x.dtype)


def _linear_init(gen, out_f, in_f, dtype, scale=1.0):
    return (torch.randn(out_f, in_f, generator=gen, dtype=torch.float64) * (scale / math.sqrt(in_f))).to(dtype)


def _norm_init(gen, n, dtype):
    return (1.0 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)


@dataclass
class _Layer:
    ln1: Tensor
    wq: Tensor
    wk: Tensor
    wv: Tensor
    wo: Tensor
    q_norm: Tensor
    k_norm: Tensor
    ln2: Tensor
    w_gate: Tensor
    w_up: Tensor
    w_down: Tensor


class TinyQwen3:
    """Qwen3-style decoder: GQA with per-head q/k RMSNorm, neox RoPE, SwiGLU MLP.

    Weights are random from ``cfg.seed``. The KV cache is paged:
    ``[num_layers, num_pages, page_size, Hkv, D]`` in the model's dtype, slot
    ``s`` = page ``s // page_size``, row ``s % page_size`` (as in SPEC).
    """

    def __init__(self, cfg: TargetConfig, device="cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(cfg.seed)
        dt, H, D = cfg.dtype, cfg.hidden_size, cfg.head_dim
        self.embed = torch.randn(cfg.vocab_size, H, generator=gen, dtype=torch.float64).to(dt)
        self.layers: List[_Layer] = []
        for _ in range(cfg.num_layers):
            self.layers.append(_Layer(
                ln1=_norm_init(gen, H, dt),
                wq=_linear_init(gen, cfg.num_heads * D, H, dt),
                wk=_linear_init(gen, cfg.num_kv_heads * D, H, dt),
                wv=_linear_init(gen, cfg.num_kv_heads * D, H, dt),
                wo=_linear_init(gen, H, cfg.num_heads * D, dt, scale=0.5),
                q_norm=_norm_init(gen, D, dt),
                k_norm=_norm_init(gen, D, dt),
                ln2=_norm_init(gen, H, dt),
                w_gate=_linear_init(gen, cfg.intermediate_size, H, dt),
                w_up=_linear_init(gen, cfg.intermediate_size, H, dt),
                w_down=_linear_init(gen, H, cfg.intermediate_size, dt, scale=0.5),
            ))
        self.final_norm = _norm_init(gen, H, dt)
        if cfg.tie_embeddings:
            self.lm_head = self.embed
        else:
            self.lm_head = _linear_init(gen, cfg.vocab_size, H, dt)
        self.lm_head = self.lm_head * cfg.logit_scale
        self.cos_sin_cache = make_cos_sin_cache(cfg.max_position, D, cfg.rope_theta)
        self._to(self.device)

    def _to(self, device):
        self.embed = self.embed.to(device)
        self.lm_head = self.lm_head.to(device)
        self.final_norm = self.final_norm.to(device)
        self.cos_sin_cache = self.cos_sin_cache.to(device)
        for layer in self.layers:
            for name in layer.__dataclass_fields__:
                setattr(layer, name, getattr(layer, name).to(device))

    def new_cache(self, num_pages: int, page_size: int) -> Tuple[Tensor, Tensor]:
        """NaN-filled K and V caches ``[num_layers, num_pages, page_size, Hkv, D]``."""
        c = self.cfg
        shape = (c.num_layers, num_pages, page_size, c.num_kv_heads, c.head_dim)
        k = torch.full(shape, float("nan"), dtype=c.dtype, device=self.device)
        return k, torch.full_like(k, float("nan"))

    def forward(self, tokens: Tensor, positions: Tensor, slots: Tensor, block_table: Tensor,
                k_cache: Tensor, v_cache: Tensor, lengths: Optional[Tensor] = None,
                block_mask: Optional[Tensor] = None, block_start: Optional[Tensor] = None,
                attention_backend=None) -> Tuple[Tensor, List[Tensor]]:
        """Run ``T`` tokens per request causally over the paged cache.

        Args:
            tokens: int64 ``[B, T]``; positions: int64 ``[B, T]`` absolute positions.
            slots: int64 ``[B, T]`` where each token's K/V is written (padding
                rows point at a scratch page nobody reads).
            block_table: int32 ``[B, max_pages]``; entries past a request's
                pages may hold anything (they are clamped, then masked).
            k_cache, v_cache: ``[num_layers, num_pages, page_size, Hkv, D]``.
            lengths: int64 ``[B]`` valid rows per request (default T); rows
                past it are padding: they see no key and give NaN outputs.

        Token ``(b, i)`` sees every cached key of request b at positions
        ``<= positions[b, i]`` (the rows of this call are written first).

        Tree mode (``block_mask`` given): the T rows are the nodes of a draft
        tree, ``block_mask`` int32 ``[B, T, ceil(T/32)]`` as ``dk.tree_mask``
        builds it and ``block_start`` int64 ``[B]`` the cache index of row 0
        (the committed length); ``positions`` are then ``block_start + depth``
        (RoPE) while ``slots`` hold the rows at cache indices
        ``block_start + i``. Row i sees every key at a cache index below
        ``block_start`` and block row j iff bit j of its mask row is set
        (SPEC's ``block_mask`` rule for the last T cached keys). The math is
        still this model's float64 attention, unless ``attention_backend`` is
        given (a backend name, ``{op: backend}``, or ``"auto"``): then every
        layer's attention is ``dk.block_attention(..., block_mask=block_mask)``
        over fp16 copies of the query and the cache (k_block None: the block
        is the last T cached keys), so decisions may flip at near-ties and the
        loop is no longer exactly lossless (docs/tree.md).

        Returns:
            logits ``[B, T, V]`` and the outputs of ``cfg.capture_layers``
            (each ``[B, T, H]``), in the model's dtype.
        """
        c = self.cfg
        B, T = tokens.shape
        Hq, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        g = Hq // Hkv
        num_pages, page_size = k_cache.shape[1], k_cache.shape[2]
        pages = block_table.long().clamp(0, num_pages - 1)
        Lk = pages.shape[1] * page_size
        key_pos = torch.arange(Lk, device=tokens.device)
        if block_mask is None:
            visible = key_pos[None, None, :] <= positions[:, :, None]  # [B, T, Lk]
        else:
            j = key_pos[None, :] - block_start[:, None]                 # block row of each key
            jc = j.clamp(0, T - 1)
            words = block_mask.long().gather(2, (jc // 32)[:, None, :].expand(B, T, Lk))
            bit = ((words >> (jc % 32)[:, None, :]) & 1).bool()
            in_block = ((j >= 0) & (j < T))[:, None, :]
            visible = (j < 0)[:, None, :] | (in_block & bit)
        if lengths is not None:
            visible = visible & (torch.arange(T, device=tokens.device)[None, :] < lengths[:, None])[:, :, None]
        flat_slots = slots.reshape(-1)
        x = self.embed[tokens]
        captured = []
        for li, layer in enumerate(self.layers):
            h = rms_norm(x, layer.ln1, c.eps)
            q = (h @ layer.wq.T).view(B, T, Hq, D)
            k = (h @ layer.wk.T).view(B, T, Hkv, D)
            v = (h @ layer.wv.T).view(B, T, Hkv, D)
            q = rope_neox(rms_norm(q, layer.q_norm, c.eps), positions, self.cos_sin_cache)
            k = rope_neox(rms_norm(k, layer.k_norm, c.eps), positions, self.cos_sin_cache)
            kc = k_cache[li].view(-1, Hkv, D)
            vc = v_cache[li].view(-1, Hkv, D)
            kc.index_copy_(0, flat_slots, k.reshape(-1, Hkv, D))
            vc.index_copy_(0, flat_slots, v.reshape(-1, Hkv, D))
            keys = k_cache[li][pages].reshape(B, Lk, Hkv, D)
            vals = v_cache[li][pages].reshape(B, Lk, Hkv, D)
            # Masked keys may be NaN pages of other requests: zero them so that
            # 0 * NaN never reaches the output.
            vals = torch.where(visible.any(1)[:, :, None, None], vals, torch.zeros((), dtype=vals.dtype,
                                                                                    device=vals.device))
            if attention_backend is not None and block_mask is not None:
                attn = self._ops_attention(q, k_cache[li], v_cache[li], block_table,
                                           block_start + T, block_mask, attention_backend)
            else:
                qg = q.view(B, T, Hkv, g, D)
                scores = torch.einsum("btkgd,bskd->bkgts", qg, keys) * (D ** -0.5)
                scores = torch.where(visible[:, None, None], scores,
                                     torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device))
                probs = torch.softmax(scores, dim=-1)
                attn = torch.einsum("bkgts,bskd->btkgd", probs, vals).reshape(B, T, Hq * D)
            x = x + attn @ layer.wo.T
            h = rms_norm(x, layer.ln2, c.eps)
            x = x + (torch.nn.functional.silu(h @ layer.w_gate.T) * (h @ layer.w_up.T)) @ layer.w_down.T
            if li in c.capture_layers:
                captured.append(x)
        logits = rms_norm(x, self.final_norm, c.eps) @ self.lm_head.T
        return logits, captured

    def _ops_attention(self, q, k_cache, v_cache, block_table, context_lens, block_mask, backend):
        """One layer's tree attention through ``dk.block_attention(block_mask=...)`` in fp16."""
        import dflash_kernels as dk
        if isinstance(backend, dict):
            backend = backend.get("block_attention")
        if backend == "auto":
            backend = None
        B, T, Hq, D = q.shape
        o = dk.block_attention(q.half().contiguous(), k_cache.half(), v_cache.half(), block_table,
                               context_lens.to(torch.int32), block_mask=block_mask, backend=backend)
        return o.to(q.dtype).reshape(B, T, Hq * D)
