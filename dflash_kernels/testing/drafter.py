"""A DFlash drafter whose attention and context injection are the package's ops.

The drafter shares the target's embedding and LM head (fp16/bf16 copies, as
the ops take fp16/bf16 activations), fuses the captured target layers into a
context feature (``fc`` + ``hidden_norm`` -> :func:`fuse_target_features`),
projects that feature into every draft layer's paged K/V cache
(:func:`inject_kv`), and drafts a whole block ``[anchor, MASK x (S-1)]`` in one
pass whose attention is :func:`block_attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

import dflash_kernels as dk

from .model import TinyQwen3, rms_norm, rope_neox


@dataclass
class DrafterConfig:
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 256
    block_size: int = 16
    mask_token_id: int = 0
    eps: float = 1e-6
    seed: int = 1
    dtype: torch.dtype = torch.float16


def _w(gen, out_f, in_f, dtype, scale=1.0):
    return (torch.randn(out_f, in_f, generator=gen) * (scale / math.sqrt(in_f))).to(dtype)


def _n(gen, n, dtype):
    return (1.0 + 0.1 * torch.randn(n, generator=gen)).to(dtype)


class DFlashDrafter:
    """1..L-layer DFlash drafter over a target model; random weights from ``cfg.seed``.

    Weights that the ops read are kept in their op layouts:
    ``fc_weight [H, K*H]``, ``hidden_norm [H]``, ``kv_weight [L, 2, Hkv*D, H]``,
    ``k_norm [L, D]``.
    """

    def __init__(self, target: TinyQwen3, cfg: DrafterConfig):
        tc = target.cfg
        if cfg.head_dim != tc.head_dim:
            raise ValueError("drafter head_dim must equal the target's (they share cos_sin_cache)")
        self.cfg, self.target = cfg, target
        dev, dt, H, D = target.device, cfg.dtype, tc.hidden_size, cfg.head_dim
        L, Hq, Hkv = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads
        K = len(tc.capture_layers)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.embed = target.embed.to(dt)
        self.lm_head = target.lm_head.to(dt)
        self.fc_weight = _w(gen, H, K * H, dt).to(dev)
        self.hidden_norm = _n(gen, H, dt).to(dev)
        self.kv_weight = torch.stack([torch.stack([_w(gen, Hkv * D, H, dt), _w(gen, Hkv * D, H, dt)])
                                      for _ in range(L)]).to(dev)
        self.k_norm = torch.stack([_n(gen, D, dt) for _ in range(L)]).to(dev)
        self.q_norm = torch.stack([_n(gen, D, dt) for _ in range(L)]).to(dev)
        self.wq = [_w(gen, Hq * D, H, dt).to(dev) for _ in range(L)]
        self.wo = [_w(gen, H, Hq * D, dt, 0.5).to(dev) for _ in range(L)]
        self.ln1 = [_n(gen, H, dt).to(dev) for _ in range(L)]
        self.ln2 = [_n(gen, H, dt).to(dev) for _ in range(L)]
        self.w_gate = [_w(gen, cfg.intermediate_size, H, dt).to(dev) for _ in range(L)]
        self.w_up = [_w(gen, cfg.intermediate_size, H, dt).to(dev) for _ in range(L)]
        self.w_down = [_w(gen, H, cfg.intermediate_size, dt, 0.5).to(dev) for _ in range(L)]
        self.final_norm = _n(gen, H, dt).to(dev)
        self.cos_sin_cache = target.cos_sin_cache

    def new_cache(self, num_pages: int, page_size: int):
        """NaN-filled stacked draft caches ``[L, num_pages, page_size, Hkv, D]``."""
        c = self.cfg
        shape = (c.num_layers, num_pages, page_size, c.num_kv_heads, c.head_dim)
        k = torch.full(shape, float("nan"), dtype=c.dtype, device=self.target.device)
        return k, torch.full_like(k, float("nan"))

    def inject(self, features: Sequence[Tensor], positions: Tensor, slots: Tensor,
               k_cache: Tensor, v_cache: Tensor, backend=None) -> None:
        """Write the context K/V of N tokens into every draft layer's cache.

        Args:
            features: K captured target layers, each ``[N, H]`` (any float dtype).
            positions, slots: int64 ``[N]``; ``slots < 0`` rows are skipped.
            k_cache, v_cache: stacked ``[L, num_pages, page_size, Hkv, D]``.
        """
        feats = [f.to(self.cfg.dtype).contiguous() for f in features]
        hidden = dk.fuse_target_features(feats, self.fc_weight, self.hidden_norm, eps=self.cfg.eps,
                                         backend=_pick(backend, "fuse_target_features"))
        dk.inject_kv(hidden, self.kv_weight, self.k_norm, positions, slots, k_cache, v_cache,
                     self.cos_sin_cache, eps=self.cfg.eps, backend=_pick(backend, "inject_kv"))

    def draft_logits(self, anchor: Tensor, ctx_lens: Tensor, block_table: Tensor,
                     k_cache: Tensor, v_cache: Tensor, backend=None) -> Tensor:
        """Logits ``[B, S-1, V]`` (fp32) of the block ``[anchor, MASK x (S-1)]``.

        ``anchor`` int64 ``[B]`` sits at position ``ctx_lens[b]`` (int32 ``[B]``,
        the tokens whose context K/V the draft cache holds).
        """
        c = self.cfg
        B, S = anchor.shape[0], c.block_size
        dev = anchor.device
        Hq, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        tokens = torch.full((B, S), c.mask_token_id, dtype=torch.int64, device=dev)
        tokens[:, 0] = anchor
        pos = ctx_lens.long()[:, None] + torch.arange(S, device=dev)
        x = self.embed[tokens]
        for li in range(c.num_layers):
            h = rms_norm(x, self.ln1[li], c.eps)
            q = (h @ self.wq[li].T).view(B, S, Hq, D)
            k = (h @ self.kv_weight[li, 0].T).view(B, S, Hkv, D)
            v = (h @ self.kv_weight[li, 1].T).view(B, S, Hkv, D)
            q = rope_neox(rms_norm(q, self.q_norm[li], c.eps), pos, self.cos_sin_cache)
            k = rope_neox(rms_norm(k, self.k_norm[li], c.eps), pos, self.cos_sin_cache)
            o = dk.block_attention(q.contiguous(), k_cache[li], v_cache[li], block_table, ctx_lens,
                                   k.contiguous(), v.contiguous(),
                                   backend=_pick(backend, "block_attention"))
            x = x + o.reshape(B, S, Hq * D) @ self.wo[li].T
            h = rms_norm(x, self.ln2[li], c.eps)
            x = x + (torch.nn.functional.silu(h @ self.w_gate[li].T) * (h @ self.w_up[li].T)) @ self.w_down[li].T
        x = rms_norm(x[:, 1:], self.final_norm, c.eps)
        return (x @ self.lm_head.T).float()

    def propose(self, anchor: Tensor, ctx_lens: Tensor, block_table: Tensor, k_cache: Tensor,
                v_cache: Tensor, state=None, backend=None) -> Tensor:
        """Greedy (point-mass) drafts int64 ``[B, S-1]``."""
        return self.draft_logits(anchor, ctx_lens, block_table, k_cache, v_cache,
                                 backend=backend).argmax(-1)


class OracleDrafter(DFlashDrafter):
    """Runs the real draft pass, then replaces its drafts by a known continuation.

    ``reference``: int64 ``[B, >= max_new]`` tokens the target will emit (from a
    plain run with the same keyed sampler). Draft j of a block whose anchor is
    generated token ``g`` is ``reference[b, g + j]``. ``corrupt_at``: an int or
    a per-request sequence; ``c`` in ``1..S-1`` flips draft c of every block of
    that request, so exactly ``c - 1`` drafts are accepted; None or ``>= S``
    flips nothing. Drafts past the end of ``reference`` are the network's.
    """

    def __init__(self, target: TinyQwen3, cfg: DrafterConfig, reference: Tensor,
                 corrupt_at=None):
        super().__init__(target, cfg)
        self.reference = reference
        S, B = cfg.block_size, reference.shape[0]
        if corrupt_at is None or isinstance(corrupt_at, int):
            corrupt_at = [corrupt_at] * B
        self.corrupt_at = torch.tensor([S if c is None else c for c in corrupt_at],
                                       dtype=torch.int64, device=reference.device)

    def propose(self, anchor, ctx_lens, block_table, k_cache, v_cache, state=None, backend=None):
        drafts = super().propose(anchor, ctx_lens, block_table, k_cache, v_cache, backend=backend)
        S, dev = self.cfg.block_size, anchor.device
        ref = self.reference.to(dev).long()
        j = torch.arange(1, S, device=dev)
        # The anchor is generated token (seq_len - prompt_len); drafts follow it.
        g = (ctx_lens.long() - state.prompt_lens)[:, None] + j
        oracle = ref.gather(1, g.clamp(max=ref.shape[1] - 1))
        flip = j[None, :] == self.corrupt_at.to(dev)[:, None]
        oracle = torch.where(flip, (oracle + 1) % self.lm_head.shape[0], oracle)
        return torch.where(g < ref.shape[1], oracle, drafts)


def _pick(backend, op):
    """``backend`` may be None, a backend name, or a dict ``{op: backend}``."""
    if isinstance(backend, dict):
        return backend.get(op)
    return backend
