"""A minimal batched engine: page allocator, block tables, plain and DFlash loops.

Everything a step needs stays on the device: sequence lengths, anchors,
acceptance, slot mappings, output buffers. The host only decides sizes it
knows without looking at device values (prompt lengths, the block size, the
token budget) and reads device values back to stop the speculative loop and,
when asked, to print.

Conventions (docs/e2e.md):
- ``seq_len[b]``: tokens of request b whose target K/V are in the target cache;
  the same tokens' context K/V are in the draft cache, so it is also the
  drafter's ``context_lens``.
- ``anchor[b]``: the last emitted token, at position ``seq_len[b]``, not yet in
  either cache.
- The target cache and the draft caches share one allocator and one block
  table (slot of position p = ``block_table[b, p // page] * page + p % page``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

import dflash_kernels as dk

from .drafter import DFlashDrafter, _pick
from .model import TinyQwen3

SCRATCH_PAGE = 0  # padding rows of the target write here; never allocated to a request


class PageAllocator:
    """Hands out pages of a shared pool in a shuffled order (page 0 is scratch)."""

    def __init__(self, num_pages: int, page_size: int, seed: int = 0):
        self.num_pages, self.page_size = num_pages, page_size
        order = torch.randperm(num_pages - 1, generator=torch.Generator().manual_seed(seed)) + 1
        self.free = [int(p) for p in order]

    def alloc(self, num_tokens: int) -> List[int]:
        n = math.ceil(num_tokens / self.page_size)
        if n > len(self.free):
            raise RuntimeError(f"out of pages: need {n}, {len(self.free)} free")
        pages, self.free = self.free[:n], self.free[n:]
        return pages

    def release(self, pages: Sequence[int]) -> None:
        self.free.extend(pages)


@dataclass
class BatchState:
    """Per-request device state of one generation."""
    block_table: Tensor      # int32 [B, max_pages]
    prompt_lens: Tensor      # int64 [B]
    seq_len: Tensor          # int32 [B]
    anchor: Tensor           # int64 [B]
    generated: Tensor        # int32 [B], tokens emitted so far (the anchor included)
    out: Tensor              # int32 [B, cap + 1]; the last column is a sink
    temperature: Tensor      # fp32 [B]
    seeds: Tensor            # int64 [B]
    k_cache: Tensor          # target [layers, P, page, Hkv, D]
    v_cache: Tensor
    dk_cache: Optional[Tensor] = None   # draft [L, P, page, Hkv, D]
    dv_cache: Optional[Tensor] = None
    pages: List[List[int]] = field(default_factory=list)


@dataclass
class GenerationResult:
    tokens: Tensor           # int32 [B, max_new]
    accept_lens: Tensor      # int32 [steps, B]: accepted drafts per step, -1 once finished
    steps: int

    def accepted_per_step(self) -> Tensor:
        """fp64 ``[B]``: mean accepted drafts over the steps a request was active."""
        a = self.accept_lens.double()
        active = a >= 0
        return (a.clamp(min=0).sum(0) / active.sum(0).clamp(min=1)).to(torch.float64)

    def tokens_per_step(self) -> Tensor:
        return self.accepted_per_step() + 1.0


def slots_of(block_table: Tensor, positions: Tensor, page_size: int) -> Tensor:
    """int64 slots of ``positions [B, T]`` through ``block_table [B, max_pages]``."""
    page = block_table.long().gather(1, positions // page_size)
    return page * page_size + positions % page_size


class Engine:
    """Runs a target (and optionally a DFlash drafter) over a batch of prompts.

    Args:
        target: the target model. drafter: a :class:`DFlashDrafter` or None.
        page_size: tokens per cache page. backend: None, a backend name, or
            ``{op: backend}`` for the package's ops.
        poison_table: fill unused block-table entries with garbage (-1, huge
            ids, ids of spare NaN pages) instead of -1; the ops must never
            read them (the target clamps and masks them).
    """

    def __init__(self, target: TinyQwen3, drafter: Optional[DFlashDrafter] = None, *,
                 page_size: int = 16, backend=None, poison_table: bool = True, spare_pages: int = 3,
                 seed: int = 0):
        self.target, self.drafter = target, drafter
        self.page_size, self.backend = page_size, backend
        self.poison_table, self.spare_pages, self.seed = poison_table, spare_pages, seed
        self.device = target.device

    # ------------------------------------------------------------------ setup

    def _start(self, prompts: Sequence[Sequence[int]], max_new: int, temperature: Sequence[float],
               seeds: Sequence[int], block_size: int) -> BatchState:
        dev, B = self.device, len(prompts)
        # Host-known worst case: the last active step starts below max_new emitted
        # tokens, may commit a whole block, and later (frozen) steps still write
        # one block of target K/V past it.
        caps = [len(p) + max_new + 2 * block_size for p in prompts]
        pages_per_req = [math.ceil(c / self.page_size) for c in caps]
        num_pages = 1 + sum(pages_per_req) + self.spare_pages
        alloc = PageAllocator(num_pages, self.page_size, seed=self.seed)
        max_pages = max(pages_per_req) + 2  # extra columns stay poisoned
        table = torch.full((B, max_pages), -1, dtype=torch.int32)
        if self.poison_table:
            spare = alloc.free[len(alloc.free) - self.spare_pages:]  # never allocated: NaN pages
            garbage = torch.tensor([-1, 2 ** 31 - 1, num_pages] + spare, dtype=torch.int32)
            idx = torch.arange(B * max_pages) % garbage.numel()
            table = garbage[idx].view(B, max_pages).clone()
        pages = []
        for b, c in enumerate(caps):
            pg = alloc.alloc(c)
            pages.append(pg)
            table[b, :len(pg)] = torch.tensor(pg, dtype=torch.int32)
        k_cache, v_cache = self.target.new_cache(num_pages, self.page_size)
        dkc = dvc = None
        if self.drafter is not None:
            dkc, dvc = self.drafter.new_cache(num_pages, self.page_size)
        cap = max_new + block_size
        return BatchState(
            block_table=table.to(dev),
            prompt_lens=torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=dev),
            seq_len=torch.zeros(B, dtype=torch.int32, device=dev),
            anchor=torch.zeros(B, dtype=torch.int64, device=dev),
            generated=torch.zeros(B, dtype=torch.int32, device=dev),
            out=torch.full((B, cap + 1), -1, dtype=torch.int32, device=dev),
            temperature=torch.tensor(list(temperature), dtype=torch.float32, device=dev),
            seeds=torch.tensor(list(seeds), dtype=torch.int64, device=dev),
            k_cache=k_cache, v_cache=v_cache, dk_cache=dkc, dv_cache=dvc, pages=pages)

    def _verify(self, st: BatchState, logits: Tensor, block_tokens: Tensor):
        return dk.verify_chain(logits.float().contiguous(), block_tokens,
                               temperature=st.temperature, seeds=st.seeds,
                               positions=st.seq_len.long(), seq_lens=st.seq_len,
                               backend=_pick(self.backend, "verify_chain"))

    def _prefill(self, st: BatchState, prompts: Sequence[Sequence[int]]) -> None:
        """Target over the padded prompts, draft-context injection, first token."""
        dev, B = self.device, len(prompts)
        T = max(len(p) for p in prompts)
        tokens = torch.zeros((B, T), dtype=torch.int64)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.tensor(list(p), dtype=torch.int64)
        tokens = tokens.to(dev)
        pos = torch.arange(T, device=dev)[None, :].expand(B, T)
        valid = pos < st.prompt_lens[:, None]
        slots = torch.where(valid, slots_of(st.block_table, pos, self.page_size),
                            SCRATCH_PAGE * self.page_size)
        logits, feats = self.target.forward(tokens, pos, slots, st.block_table, st.k_cache, st.v_cache,
                                            lengths=st.prompt_lens)
        if self.drafter is not None:
            self.drafter.inject([f.reshape(B * T, -1) for f in feats], pos.reshape(-1),
                                torch.where(valid, slots, -1).reshape(-1), st.dk_cache, st.dv_cache,
                                backend=self.backend)
        last = (st.prompt_lens - 1)
        last_logits = logits[torch.arange(B, device=dev), last][:, None]   # [B, 1, V]
        last_tok = tokens.gather(1, last[:, None])                          # [B, 1]
        # The last prompt token plays the anchor: its position keys the sample.
        st.seq_len = (st.prompt_lens - 1).to(torch.int32)
        v = self._verify(st, last_logits, last_tok)
        st.seq_len = st.prompt_lens.to(torch.int32)
        st.anchor = v.bonus.long()
        st.out[:, 0] = v.bonus
        st.generated = torch.ones(B, dtype=torch.int32, device=dev)

    def _record(self, st: BatchState, out_tokens: Tensor, active: Tensor) -> None:
        """Append the valid entries of ``out_tokens [B, S]`` of active requests."""
        B, S = out_tokens.shape
        sink = st.out.shape[1] - 1
        col = st.generated.long()[:, None] + torch.arange(S, device=self.device)
        keep = (out_tokens >= 0) & active[:, None] & (col < sink)
        st.out.scatter_(1, torch.where(keep, col, sink), out_tokens)

    def _advance(self, st: BatchState, v, active: Tensor, history: list, on_step) -> None:
        """After a verify (chain or tree output): emit, move seq_len / anchor of active requests."""
        self._record(st, v.out_tokens, active)
        st.generated = torch.where(active, st.generated + v.accept_len + 1, st.generated)
        st.seq_len = torch.where(active, v.new_seq_lens, st.seq_len)
        st.anchor = torch.where(active, v.bonus.long(), st.anchor)
        history.append(torch.where(active, v.accept_len, -1))
        if on_step is not None:
            on_step(v.accept_len, v.out_tokens, active)

    def _result(self, st: BatchState, history: list, max_new: int) -> GenerationResult:
        B = st.out.shape[0]
        hist = (torch.stack(history) if history
                else torch.zeros((0, B), dtype=torch.int32, device=self.device))
        return GenerationResult(st.out[:, :max_new].clone(), hist, len(history))

    # ------------------------------------------------------------------ loops

    def generate_plain(self, prompts, max_new: int, temperature, seeds,
                       on_step: Optional[Callable] = None) -> GenerationResult:
        """Non-speculative decoding with the same keyed sampler (verify_chain, S = 1)."""
        st = self._start(prompts, max_new, temperature, seeds, block_size=1)
        self._prefill(st, prompts)
        B = len(prompts)
        for _ in range(max_new - 1):
            pos = st.seq_len.long()[:, None]
            slots = slots_of(st.block_table, pos, self.page_size)
            logits, _ = self.target.forward(st.anchor[:, None], pos, slots, st.block_table,
                                            st.k_cache, st.v_cache)
            v = self._verify(st, logits, st.anchor[:, None])
            active = torch.ones(B, dtype=torch.bool, device=self.device)
            self._record(st, v.out_tokens, active)
            st.generated = st.generated + 1
            st.seq_len = v.new_seq_lens
            st.anchor = v.bonus.long()
            if on_step is not None:
                on_step(v.accept_len, v.out_tokens, active)
        steps = max(max_new - 1, 0)
        return GenerationResult(st.out[:, :max_new].clone(),
                                torch.zeros((steps, B), dtype=torch.int32, device=self.device), steps)

    def generate_speculative(self, prompts, max_new: int, temperature, seeds,
                             max_steps: Optional[int] = None,
                             on_step: Optional[Callable] = None) -> GenerationResult:
        """DFlash decoding: draft a block, verify it, inject the committed tokens."""
        if self.drafter is None:
            raise ValueError("generate_speculative needs a drafter")
        S = self.drafter.cfg.block_size
        st = self._start(prompts, max_new, temperature, seeds, block_size=S)
        self._prefill(st, prompts)
        self.state = st
        dev = self.device
        B = len(prompts)
        rows = torch.arange(S, device=dev)
        history = []
        for active in _active_steps(st, max_new, max_steps):
            drafts = self.drafter.propose(st.anchor, st.seq_len, st.block_table, st.dk_cache,
                                          st.dv_cache, state=st, backend=self.backend)
            block = torch.cat([st.anchor[:, None], drafts.long()], dim=1)          # [B, S]
            pos = st.seq_len.long()[:, None] + rows                              # [B, S]
            slots = slots_of(st.block_table, pos, self.page_size)
            logits, feats = self.target.forward(block, pos, slots, st.block_table,
                                                st.k_cache, st.v_cache)
            v = self._verify(st, logits, block)
            # Committed rows: the anchor and the accepted drafts of active requests.
            commit = (rows[None, :] <= v.accept_len[:, None]) & active[:, None]
            self.drafter.inject([f.reshape(B * S, -1) for f in feats], pos.reshape(-1),
                                torch.where(commit, slots, -1).reshape(-1),
                                st.dk_cache, st.dv_cache, backend=self.backend)
            self._advance(st, v, active, history, on_step)
        return self._result(st, history, max_new)

    def _verify_tree(self, st: BatchState, logits: Tensor, tree_tokens: Tensor, parents: Tensor,
                     num_nodes: Tensor):
        return dk.verify_tree(logits.float().contiguous(), tree_tokens, parents, num_nodes=num_nodes,
                              temperature=st.temperature, seeds=st.seeds, positions=st.seq_len.long(),
                              seq_lens=st.seq_len, backend=_pick(self.backend, "verify_tree"))

    def generate_tree(self, prompts, max_new: int, temperature, seeds, num_nodes: int, top_k: int = 8,
                      max_steps: Optional[int] = None, on_step: Optional[Callable] = None,
                      target_attention=None) -> GenerationResult:
        """Tree DFlash decoding (docs/tree.md): per step, draft one block, build a tree
        of ``num_nodes`` slots from the draft logits (``build_tree``, ``top_k``
        candidates per depth), run the target over the tree (``tree_mask``,
        positions ``seq_len + depth``), ``verify_tree``, then keep the accepted
        path: its target K/V move to consecutive cache indices (``copy_kv``) and
        its captured hidden states are injected into the draft cache
        (``inject_kv``). ``target_attention``: None (the target's own float64
        attention, exactly lossless) or a backend for ``dk.block_attention``
        with the tree's ``block_mask`` (fp16; see TinyQwen3.forward).
        The host reads one value per step, to stop (as generate_speculative)."""
        if self.drafter is None:
            raise ValueError("generate_tree needs a drafter")
        S, N = self.drafter.cfg.block_size, int(num_nodes)
        if N < 1:
            raise ValueError(f"num_nodes: expected >= 1, got {num_nodes}")
        st = self._start(prompts, max_new, temperature, seeds, block_size=max(S, N))
        self._prefill(st, prompts)
        self.state = st
        dev, ps, B = self.device, self.page_size, len(prompts)
        nodes = torch.arange(N, device=dev)
        rows = torch.arange(S, device=dev)   # the accepted path, root included, has at most S rows
        history = []
        for active in _active_steps(st, max_new, max_steps):
            draft = self.drafter.draft_logits(st.anchor, st.seq_len, st.block_table, st.dk_cache,
                                              st.dv_cache, backend=self.backend)       # [B, S-1, V]
            tree = dk.build_tree(draft, N, top_k=top_k, backend=_pick(self.backend, "build_tree"))
            tokens = tree.tree_tokens.long().clone()
            tokens[:, 0] = st.anchor
            parents = tree.parents.to(torch.int32)
            mask, depth = dk.tree_mask(parents, backend=_pick(self.backend, "tree_mask"))
            c = st.seq_len.long()
            # Slot i's K/V at cache index c + i, its RoPE position c + depth(i).
            slots = slots_of(st.block_table, c[:, None] + nodes, ps)
            logits, feats = self.target.forward(tokens.clamp(min=0), c[:, None] + depth.long(), slots,
                                                st.block_table, st.k_cache, st.v_cache,
                                                block_mask=mask, block_start=c,
                                                attention_backend=target_attention)
            v = self._verify_tree(st, logits, tokens, parents, tree.num_nodes)
            # Target K/V of the accepted path: node accepted_nodes[k] -> cache index c + 1 + k.
            path = v.accepted_nodes.long()                                        # [B, N]
            keep = (nodes[None, :] < v.accept_len[:, None]) & active[:, None]
            src = slots_of(st.block_table, c[:, None] + path.clamp(min=0), ps)
            dst = torch.where(keep, slots_of(st.block_table, c[:, None] + 1 + nodes, ps), -1)
            dk.copy_kv(src.reshape(-1), dst.reshape(-1), st.k_cache, st.v_cache,
                       backend=_pick(self.backend, "copy_kv"))
            # Draft context of the committed rows (the anchor and the path) at c + j.
            node_of = torch.cat([torch.zeros_like(path[:, :1]), path[:, :S - 1]], 1)  # [B, S]
            commit = (rows[None, :] <= v.accept_len[:, None]) & active[:, None]
            node_of = torch.where(commit, node_of, 0)
            H = feats[0].shape[-1]
            picked = [f.gather(1, node_of[:, :, None].expand(B, S, H)).reshape(B * S, H) for f in feats]
            ipos = c[:, None] + rows
            islots = torch.where(commit, slots_of(st.block_table, ipos, ps), -1)
            self.drafter.inject(picked, ipos.reshape(-1), islots.reshape(-1), st.dk_cache, st.dv_cache,
                                backend=self.backend)
            self._advance(st, v, active, history, on_step)
        return self._result(st, history, max_new)


def _active_steps(st, max_new: int, max_steps: Optional[int]):
    """Each step's ``active [B]`` mask (requests below ``max_new`` emitted tokens),
    until all are done or ``max_steps`` (default ``max_new``) steps ran. The host
    read to stop is the only sync of a step."""
    for _ in range(max_new if max_steps is None else max_steps):
        active = st.generated < max_new
        if not bool(active.any()):
            return
        yield active
