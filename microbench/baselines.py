"""What engines run today for the same step, to compare our ops with.

``torch``: the PyTorch compositions (gather + SDPA; GEMM + RMSNorm + GEMM +
norm + RoPE + per-layer index_copy_; softmax + argmax + cumprod). They use
host-known sizes only (every request of a bench case has the same context
length), so they are CUDA-graph capturable like an engine's.

``flashinfer`` and ``flash_attn``: the paged-attention libraries, when
importable (never required). They read the block's keys from the cache, so
their cases hold the block K/V as the last S cached tokens (the bench writes
them there when it builds the inputs).

``flashinfer`` for ``verify_chain``'s sampled modes: FlashInfer's samplers
(``flashinfer.sampling``) composed into the same step, when importable:
:func:`flashinfer_verify_chain` (the calls per mode are listed there and in
docs/verify_chain.md, "Benchmark").
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from dflash_kernels._dtypes import FP8_MAX


def optional_module(*names):
    """The first of ``names`` that imports, or None."""
    for name in names:
        try:
            return importlib.import_module(name)
        except Exception:  # ImportError, or a broken binary build
            continue
    return None


# ---------------------------------------------------------------- attention

def torch_attention(inp):
    """Gather each request's pages into dense K/V, append the block keys, SDPA (no mask; a band
    with a window; with ``block_anc``, a tree row: the dense bool mask of the block's keys)."""
    q, kc, vc, bt = inp["q"], inp["k_cache"], inp["v_cache"], inp["block_table"]
    ctx, npages, window = inp["ctx"], inp["ctx_pages"], inp["window"]
    B, S, Hq, D = q.shape
    Hkv = kc.shape[2]
    table = bt[:, :npages].long()

    def dense(cache, block, scale):
        x = cache[table].reshape(B, -1, Hkv, D)[:, :ctx]
        if scale is not None:
            x = x.to(q.dtype) * scale.to(q.dtype)
        return torch.cat([x, block], dim=1).transpose(1, 2)         # [B, Hkv, ctx+S, D]

    k = dense(kc, inp["k_block"], inp["k_scale"])
    v = dense(vc, inp["v_block"], inp["v_scale"])
    mask = None
    if window > 0:
        qpos = torch.arange(S, device=q.device)[:, None] + ctx
        kpos = torch.arange(ctx + S, device=q.device)[None, :]
        mask = (qpos - kpos).abs() < window
    anc = inp.get("block_anc")          # bool [B, S, S]: a tree block_mask, dense
    if anc is not None:
        tree = torch.cat([anc.new_ones(B, S, ctx), anc], dim=2)[:, None]
        mask = tree if mask is None else mask & tree
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask,
                                       scale=inp["sm_scale"], enable_gqa=Hq != Hkv)
    return o.transpose(1, 2)


def flashinfer_attention(module):
    """BatchPrefillWithPagedKVCacheWrapper, causal=False, over the cached block (plan made once per input set)."""

    def run(inp):
        q = inp["q"]
        B, S, Hq, D = q.shape
        kc = inp["k_cache"]
        state = inp.get("_flashinfer")
        if state is None:
            dev = q.device
            page = kc.shape[1]
            total = inp["ctx"] + S
            npages = -(-total // page)
            workspace = torch.empty(128 * 2**20, dtype=torch.uint8, device=dev)
            wrapper = module.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
            qo_indptr = torch.arange(B + 1, dtype=torch.int32, device=dev) * S
            kv_indptr = torch.arange(B + 1, dtype=torch.int32, device=dev) * npages
            kv_indices = inp["block_table"][:, :npages].reshape(-1).contiguous()
            last = torch.full((B,), total - (npages - 1) * page, dtype=torch.int32, device=dev)
            wrapper.plan(qo_indptr, kv_indptr, kv_indices, last, Hq, kc.shape[2], D, page,
                         causal=False, sm_scale=inp["sm_scale"], q_data_type=q.dtype,
                         kv_data_type=kc.dtype)
            state = inp["_flashinfer"] = (wrapper, workspace)
        fn = getattr(state[0], "run", None) or state[0].forward
        return fn(q.reshape(B * S, Hq, D), (kc, inp["v_cache"])).reshape(B, S, Hq, D)

    return run


def flash_attn_attention(module):
    """flash_attn_with_kvcache(causal=False) over the cached block (cache_seqlens = ctx + S)."""

    def run(inp):
        q = inp["q"]
        S = q.shape[1]
        w = inp["window"]
        kwargs = {"window_size": (w - 1, w - 1)} if w > 0 else {}
        out = module.flash_attn_with_kvcache(
            q, inp["k_cache"], inp["v_cache"], cache_seqlens=inp["context_lens"] + S,
            block_table=inp["block_table"], softmax_scale=inp["sm_scale"], causal=False, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return run


# ---------------------------------------------------------------- injection

def _rms_norm(x, weight, eps):
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight.float()


def _store(x, cache_dtype, scale):
    if cache_dtype in FP8_MAX:
        m = FP8_MAX[cache_dtype]
        return (x.float() / scale.float()).clamp(-m, m).to(cache_dtype)
    return x.to(cache_dtype)


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def torch_fuse(inp):
    """fc GEMM over the concatenated features, then RMSNorm."""
    x = inp["features"] @ inp["fc_weight"].T
    return _rms_norm(x, inp["norm_weight"], inp["eps"]).to(x.dtype)


def _norm_rope_store(k, v, inp):
    """k, v [N, L, Hkv, D]: per-head K norm + neox RoPE, then one index_copy_ per layer and cache."""
    kc, vc = inp["k_cache"], inp["v_cache"]
    L, _, _, Hkv, D = kc.shape
    k = _rms_norm(k, inp["k_norm_weight"][None, :, None, :], inp["eps"])
    half = D // 2
    cs = inp["cos_sin_cache"][inp["positions"]]                     # [N, D]
    cos, sin = cs[:, None, None, :half], cs[:, None, None, half:]
    k1, k2 = k[..., :half], k[..., half:]
    k = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
    # Rejected rows go to the engine's padding page (the last page), as SGLang's slot 0.
    dst = torch.where(inp["slot_mapping"] >= 0, inp["slot_mapping"], inp["pad_slot"])
    # Copied as integer bits: index_copy_ has no fp8 kernels on every device.
    ks = _bits(_store(k, kc.dtype, inp["k_scale"]))
    vs = _bits(_store(v, vc.dtype, inp["v_scale"]))
    kb, vb = _bits(kc), _bits(vc)
    for layer in range(L):
        kb[layer].view(-1, Hkv, D).index_copy_(0, dst, ks[:, layer])
        vb[layer].view(-1, Hkv, D).index_copy_(0, dst, vs[:, layer])
    return kc, vc


def torch_inject_kv(inp, hidden=None):
    """Stacked K/V GEMM of every layer, norm + RoPE, per-layer index_copy_."""
    hidden = inp["hidden"] if hidden is None else hidden
    kv_weight = inp["kv_weight"]
    L, _, HD, H = kv_weight.shape
    Hkv = inp["k_cache"].shape[3]
    kv = (hidden @ kv_weight.reshape(L * 2 * HD, H).T).view(-1, L, 2, Hkv, HD // Hkv)
    return _norm_rope_store(kv[:, :, 0], kv[:, :, 1], inp)


def torch_write_kv(inp):
    return _norm_rope_store(inp["k"], inp["v"], inp)


def torch_injection(inp):
    return torch_inject_kv(inp, hidden=torch_fuse(inp))


# ---------------------------------------------------------------- verify

def torch_verify_greedy(inp):
    """softmax, argmax, compare with the drafts, cumprod prefix match, gather the bonus."""
    logits = inp["logits"]
    target = torch.softmax(logits.float(), dim=-1).argmax(dim=-1)   # [B, S]
    return chain_accept(target, inp["block_tokens"], inp["num_drafts"])


def chain_accept(target, tokens, num_drafts):
    """The chain walk over per-row target tokens ``target [B, S]`` (row j's token decides
    draft j+1): compare with the drafts, cumprod prefix match, gather the bonus, lay out
    ``out_tokens`` (accepted drafts, the bonus, -1). Device ops only, no host sync."""
    B, S = target.shape
    dev = target.device
    cols = torch.arange(1, S, device=dev)[None, :]
    match = (tokens[:, 1:] == target[:, :-1]) & (cols <= num_drafts[:, None])
    accept = match.to(torch.int32).cumprod(dim=1).sum(dim=1, dtype=torch.int32)
    bonus = target.gather(1, accept.long()[:, None]).squeeze(1).to(torch.int32)
    pos = torch.arange(S, device=dev)[None, :]
    drafts = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1).to(torch.int32)
    out = torch.where(pos < accept[:, None], drafts, torch.full_like(drafts, -1))
    out = torch.where(pos == accept[:, None], bonus[:, None], out)
    return accept, out, bonus


# Sampler flags of verify_chain's sampled modes (microbench/suites/verify_chain.py).
VERIFY_SAMPLERS = {
    "sampled": {},
    "top_k": {"top_k": True},
    "top_p": {"top_p": True},
    "top_k+top_p": {"top_k": True, "top_p": True},
    "top_k+top_p_joint": {"top_k": True, "top_p": True, "joint": True},
    "draft_probs": {"draft_probs": True},
}


def flashinfer_verify_calls(mode):
    """The ``flashinfer.sampling`` functions :func:`flashinfer_verify_chain` calls for ``mode``."""
    flags = VERIFY_SAMPLERS[mode]
    if flags.get("draft_probs"):
        return ("softmax", "chain_speculative_sampling")
    if flags.get("top_k") and flags.get("top_p"):
        return ("softmax", "top_k_top_p_sampling_from_probs")
    if flags.get("top_k"):
        return ("softmax", "top_k_sampling_from_probs")
    if flags.get("top_p"):
        return ("softmax", "top_p_sampling_from_probs")
    return ("sampling_from_logits",)


def _takes(fn, *names):
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(n in params for n in names)


def flashinfer_takes_seed(sampling, mode) -> bool:
    """Whether this FlashInfer's samplers for ``mode`` take ``seed`` / ``offset`` tensors
    (the CUDA-graph capturable form; without them each call reads and advances the
    torch generator's state on the host, so the row is timed with events)."""
    samplers = [n for n in flashinfer_verify_calls(mode) if n != "softmax"]
    return all(_takes(getattr(sampling, n, None), "seed", "offset") for n in samplers)


def flashinfer_verify_chain(sampling, mode):
    """verify_chain's sampled ``mode`` composed from FlashInfer's samplers (``sampling``:
    the ``flashinfer.sampling`` module). Per request parameters are expanded to the
    ``B*S`` rows (views and one copy each: device ops).

    - ``sampled``: ``sampling_from_logits(logits / T)`` (Gumbel-max over the logits),
      then :func:`chain_accept` (compare with the drafts, cumprod, bonus).
    - ``top_k`` / ``top_p`` / ``top_k+top_p`` (``filter_apply_order="top_k_first"``) /
      ``top_k+top_p_joint`` (``"joint"``): ``softmax(logits, temperature=T)``, then
      ``top_k_sampling_from_probs`` / ``top_p_sampling_from_probs`` /
      ``top_k_top_p_sampling_from_probs``, then :func:`chain_accept`.
    - ``draft_probs``: ``softmax(logits, temperature=T)`` as ``target_probs``, then
      ``chain_speculative_sampling(draft_probs, drafts, target_probs)`` (the rejection
      rule), whose ``output_emitted_draft_token_num`` is ``accept_len``.

    With ``seed`` / ``offset`` in the samplers' signatures the calls get per-row seed
    tensors (the request's seed) and offsets (its position + row + 1), as an engine
    would pass them under CUDA graphs. Returns our four outputs plus the library's own
    per-row (or per-request) sampled tokens as a fifth tensor, which tells the suite's
    check that these tokens come from another random stream.
    """
    flags = VERIFY_SAMPLERS[mode]
    seeded = flashinfer_takes_seed(sampling, mode)

    def run(inp):
        logits, tokens, nd = inp["logits"], inp["block_tokens"], inp["num_drafts"]
        B, S, V = logits.shape
        R = B * S

        def rows(x):                       # per request [B] -> per row [B*S]
            return x[:, None].expand(B, S).reshape(R)

        temp = rows(inp["temperature"])
        flat = logits.reshape(R, V)
        kw = {}
        if seeded:
            steps = torch.arange(1, S + 1, device=logits.device, dtype=torch.int64)
            if flags.get("draft_probs"):
                kw = {"seed": inp["seeds"], "offset": inp["positions"] + 1}
            else:
                kw = {"seed": rows(inp["seeds"]),
                      "offset": (inp["positions"][:, None] + steps).reshape(R)}
        if flags.get("draft_probs"):
            probs = sampling.softmax(flat, temperature=temp).view(B, S, V)
            drafts = tokens[:, 1:].to(torch.int32).contiguous()
            out, _, emitted = sampling.chain_speculative_sampling(
                inp["draft_probs_f32"], drafts, probs, **kw)
            accept = emitted.to(torch.int32)
            out = out.to(torch.int32)
            bonus = out.gather(1, accept.long()[:, None]).squeeze(1)
            raw = out
        else:
            if flags.get("top_k") or flags.get("top_p"):
                probs = sampling.softmax(flat, temperature=temp)
                if flags.get("top_k") and flags.get("top_p"):
                    order = "joint" if flags.get("joint") else "top_k_first"
                    t = sampling.top_k_top_p_sampling_from_probs(
                        probs, rows(inp["top_k"]), rows(inp["top_p"]),
                        filter_apply_order=order, **kw)
                elif flags.get("top_k"):
                    t = sampling.top_k_sampling_from_probs(probs, rows(inp["top_k"]), **kw)
                else:
                    t = sampling.top_p_sampling_from_probs(probs, rows(inp["top_p"]), **kw)
            else:
                t = sampling.sampling_from_logits(flat.float() / temp[:, None], **kw)
            raw = t.view(B, S)
            accept, out, bonus = chain_accept(raw, tokens, nd)
        return accept, out, bonus, inp["seq_lens"] + accept + 1, raw

    return run


# ---------------------------------------------------------------- trees
# Host-known sizes only, no host sync (CUDA-graph capturable): the tree walks run
# ceil(log2 N) pointer-doubling rounds instead of a data-dependent loop.

def _tree_pointers(parents):
    """(used bool [B, N], q int64 [B, N]: the parent of a used slot > 0, else the slot itself)."""
    B, N = parents.shape
    idx = torch.arange(N, device=parents.device)
    par = parents.long()
    ok = ((par >= 0) & (par < idx)) | (idx == 0)
    used = ok.to(torch.int32).cumprod(dim=1).bool()
    return used, torch.where(used & (idx > 0), par, idx.expand(B, N))


def _rounds(n):
    return max(1, (n - 1).bit_length())


def torch_tree_mask(inp):
    """Ancestor sets by pointer doubling over bool [B, N, N], then packed to int32 words."""
    parents = inp["parents"]
    B, N = parents.shape
    _, q = _tree_pointers(parents)
    idx = torch.arange(N, device=parents.device)
    # Self and parent (F.one_hot would check its input's range on the host: a sync).
    anc = (idx[None, :, None] == idx) | (q[:, :, None] == idx)
    for _ in range(_rounds(N)):
        anc = anc | anc.gather(1, q[:, :, None].expand(B, N, N))
        q = q.gather(1, q)
    depth = anc.sum(-1, dtype=torch.int32) - 1
    W = (N + 31) // 32
    bits = F.pad(anc, (0, W * 32 - N)).view(B, N, W, 32).long()
    weights = torch.ones(32, dtype=torch.int64, device=parents.device) << torch.arange(
        32, device=parents.device)
    words = (bits * weights).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words, depth


def torch_verify_tree_greedy(inp):
    """argmax per node, match each node's token with its parent's target, the lowest
    matching sibling wins, accepted = every ancestor matched (pointer doubling)."""
    logits, tok, parents = inp["logits"], inp["tree_tokens"].long(), inp["parents"]
    B, N, _ = logits.shape
    idx = torch.arange(N, device=logits.device)
    target = logits.argmax(dim=-1)                                  # [B, N], first max on ties
    used, q = _tree_pointers(parents)
    match = used & (idx > 0) & (tok == target.gather(1, q))
    lower_sib = (q[:, :, None] == q[:, None, :]) & match[:, None, :] & (idx[None, :] < idx[:, None])
    ok = (match & ~lower_sib.any(-1)) | (idx == 0)
    for _ in range(_rounds(N)):
        ok = ok & ok.gather(1, q)
        q = q.gather(1, q)
    acc = ok & (idx > 0)
    accept = acc.sum(-1, dtype=torch.int32)
    nodes = torch.where(acc, idx, N).sort(dim=-1).values
    nodes = torch.where(nodes < N, nodes, -1)
    bonus = target.gather(1, torch.where(acc, idx, 0).amax(-1, keepdim=True)).squeeze(1)
    path_tok = tok.gather(1, nodes.clamp(min=0))
    a = accept.long()[:, None]
    out = torch.where(idx < a, path_tok, torch.where(idx == a, bonus[:, None], -1))
    return (accept, nodes.to(torch.int32), out.to(torch.int32), bonus.to(torch.int32),
            inp["seq_lens"] + accept + 1)


def torch_copy_kv(inp):
    """Per layer and cache: index_select the sources, index_copy_ them to the destinations
    (skipped pairs go to the engine's padding slot)."""
    kc, vc = inp["k_cache"], inp["v_cache"]
    L, _, _, Hkv, D = kc.shape
    src, dst = inp["src_slots"], inp["dst_slots"]
    dst = torch.where(dst >= 0, dst, inp["pad_slot"])
    for cache in (kc, vc):
        raw = _bits(cache)
        for layer in range(L):
            rows = raw[layer].view(-1, Hkv, D)
            rows.index_copy_(0, dst, rows.index_select(0, src))
    return kc, vc


def torch_build_tree(inp):
    """How engines build a tree from per-depth candidates (SGLang's EAGLE
    ``organize_draft_results``): top-k per depth by logit, then per depth a beam of
    the N - 1 best children by cumulative log-probability, then one stable sort of
    every kept candidate (best first, shallower first on ties) and the N - 1 best
    as slots 1..N-1. The same tree as the best-first one when no two candidates tie
    (the suite's random logits): an ancestor never scores below its descendants,
    and no depth holds more than N - 1 of the chosen nodes. torch.topk does not
    order exact ties, so SPEC's tie rules are not reproduced."""
    x, N, k = inp["draft_logits"], inp["num_nodes_budget"], inp["top_k"]
    B, D, _ = x.shape
    dev = x.device
    top, ids = torch.topk(x.float(), k, dim=-1)                          # sorted: rank order
    lp = top - torch.logsumexp(x.float(), dim=-1, keepdim=True)          # [B, D, k]
    score = lp[:, 0]
    tok = ids[:, 0]
    par = torch.full((B, k), -1, dtype=torch.int64, device=dev)
    levels = []
    offset = 0
    for d in range(D):
        if d > 0:
            child = (score[:, :, None] + lp[:, d, None, :]).reshape(B, -1)
            score, pick = torch.topk(child, min(child.shape[1], N - 1), dim=-1)
            par = pick // k + prev_offset
            tok = ids[:, d].gather(1, pick % k)
        elif score.shape[1] > N - 1:
            score, tok = score[:, :N - 1], tok[:, :N - 1]
            par = par[:, :N - 1]
        levels.append((score, tok, par, torch.full_like(tok, d + 1)))
        prev_offset, offset = offset, offset + score.shape[1]
    s_all, t_all, p_all, d_all = (torch.cat(c, dim=1) for c in zip(*levels))
    order = torch.sort(s_all, dim=1, descending=True, stable=True).indices[:, :N - 1]
    M = order.shape[1]
    slot_of = torch.zeros_like(s_all, dtype=torch.int64)                 # candidate -> slot (0: root)
    slot_of.scatter_(1, order, torch.arange(1, M + 1, device=dev).expand(B, M))
    p = p_all.gather(1, order)
    parents = torch.where(p < 0, 0, slot_of.gather(1, p.clamp(min=0)))
    fill = N - 1 - M
    tree_tokens = F.pad(t_all.gather(1, order), (1, fill), value=-1)
    parents = F.pad(parents, (1, fill), value=-1).to(torch.int32)
    depth = F.pad(d_all.gather(1, order), (1, fill), value=0).to(torch.int32)
    num_nodes = torch.full((B,), 1 + M, dtype=torch.int32, device=dev)
    return tree_tokens, parents, num_nodes, depth
