"""docs/engines.md's snippets, run as written against engine-shaped objects built here
(issue 18 item 7), each compared with the ops called on tensors built by hand: vLLM's
context KV, draft attention and ragged verification; SGLang's KV append, draft attention
and greedy / sampled verification."""

import pathlib
import re
from types import SimpleNamespace as NS

import torch

import dflash_kernels as dk

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "engines.md"
PAD_SLOT_ID = -1


def snippet(marker):
    """The ```python block of docs/engines.md that contains ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    hits = [b for b in blocks if marker in b]
    assert len(hits) == 1, (marker, len(hits))
    return hits[0]


def _vllm_model(L=3, H=64, Hkv=2, D=64, K=2, blocks=6, block_size=4, P=64, g=None):
    dt = torch.bfloat16
    kv = Hkv * D
    attn = [NS(kv_cache=torch.full((2, blocks, block_size, Hkv, D), 7.0, dtype=dt))
            for _ in range(L)]
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(P).float()[:, None] * inv[None]
    m = NS(_num_attn_layers=L, config=NS(hidden_size=H), _kv_size=kv,
           _fused_kv_weight=(torch.randn(L * 2 * kv, H, generator=g) / H ** 0.5).to(dt),
           _fused_kv_bias=torch.randn(L * 2 * kv, generator=g).to(dt),
           _rope_cos_sin_cache=torch.cat([ang.cos(), ang.sin()], -1).to(dt),
           _attn_layers=attn, fc=NS(weight=(torch.randn(H, K * H, generator=g) / H).to(dt)),
           _hidden_norm_weight=torch.rand(H, generator=g).to(dt) + 0.5, _rms_norm_eps=1e-6,
           _k_norm_weights=torch.rand(L, D, generator=g).to(dt) + 0.5, _rope_is_neox=True)
    return NS(model=m)


def test_vllm_context_kv_snippet():
    g = torch.Generator().manual_seed(0)
    model = _vllm_model(g=g)
    m = model.model
    L, H, kv = m._num_attn_layers, m.config.hidden_size, m._kv_size
    n, padded = 5, 8                                 # the batch's tokens; the buffers' rows
    aux = [torch.randn(padded, H, generator=g).to(torch.bfloat16) for _ in range(2)]
    slots = torch.tensor([3, PAD_SLOT_ID, 9, 6, 17, 1, 2, 0])
    speculator = NS(hidden_states=torch.full((padded, H), 5.0, dtype=torch.bfloat16),
                    context_positions=torch.tensor([0, 7, 3, 12, 60, 1, 1, 1]),
                    _context_slot_mappings=[slots])
    caches_before = [a.kv_cache.clone() for a in m._attn_layers]

    exec(snippet("precompute_and_store_context_kv"),
         dict(model=model, input_batch=NS(num_tokens=n), aux_hidden_states=aux,
              self=speculator))

    # Independent of the snippet's views: per-layer weights stacked by hand, fresh caches.
    want_hidden = dk.fuse_target_features(torch.cat([a[:n] for a in aux], -1), m.fc.weight,
                                          m._hidden_norm_weight, eps=m._rms_norm_eps)
    assert torch.equal(speculator.hidden_states[:n], want_hidden)
    assert (speculator.hidden_states[n:] == 5).all()
    w = torch.stack([torch.stack([m._fused_kv_weight[(2 * l + i) * kv:(2 * l + i + 1) * kv]
                                  for i in range(2)]) for l in range(L)])
    b = torch.stack([torch.stack([m._fused_kv_bias[(2 * l + i) * kv:(2 * l + i + 1) * kv]
                                  for i in range(2)]) for l in range(L)])
    kc = [c[0].clone() for c in caches_before]
    vc = [c[1].clone() for c in caches_before]
    dk.inject_kv(want_hidden, w, m._k_norm_weights, speculator.context_positions[:n].clone(),
                 slots[:n].clone(), kc, vc, m._rope_cos_sin_cache.float(), kv_bias=b,
                 eps=m._rms_norm_eps, rope_style="neox")
    for layer, a in enumerate(m._attn_layers):
        assert torch.equal(a.kv_cache[0], kc[layer]) and torch.equal(a.kv_cache[1], vc[layer])
        # Only the batch's valid slots changed: PAD_SLOT_ID and the padded rows' slots did not.
        flat = a.kv_cache.flatten(1, 2)
        changed = (flat != caches_before[layer].flatten(1, 2)).flatten(2).any(-1).any(0)
        assert set(changed.nonzero().flatten().tolist()) <= {3, 9, 6, 17}
        assert changed[[3, 9, 6, 17]].all()


def test_vllm_draft_attention_snippet():
    # One DFlash draft layer's attention in vLLM: fused qkv projection (with graph-padding
    # rows past B*S), q/k norm + RoPE in place on column views, block attention over the
    # layer's paged cache with the block's own keys.
    g = torch.Generator().manual_seed(1)
    dt = torch.bfloat16
    B, S, Hq, Hkv, D, H, page, pages = 2, 4, 4, 2, 64, 64, 4, 9
    T = B * S + 3                                    # padded token count
    wqkv = (torch.randn((Hq + 2 * Hkv) * D, H, generator=g) / H ** 0.5).to(dt)
    attn = NS(q_size=Hq * D, kv_size=Hkv * D, head_dim=D, num_heads=Hq, num_kv_heads=Hkv,
              qkv_proj=lambda x: (x @ wqkv.T, None),
              q_norm=NS(weight=torch.rand(D, generator=g).to(dt) + 0.5, variance_epsilon=1e-6),
              k_norm=NS(weight=torch.rand(D, generator=g).to(dt) + 0.5),
              rotary_emb=NS(is_neox_style=False), scaling=D ** -0.5, sliding_window=None,
              causal=False)
    hidden_states = torch.randn(T, H, generator=g).to(dt)
    positions = torch.randint(0, 30, (T,), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(64).float()[:, None] * inv[None]
    cos_sin = torch.cat([ang.cos(), ang.sin()], -1)
    k_cache = torch.randn(pages, page, Hkv, D, generator=g).to(dt)
    v_cache = torch.randn(pages, page, Hkv, D, generator=g).to(dt)
    seq_lens = torch.tensor([S + 7, S + 2, 99], dtype=torch.int32)  # a padded request row
    table = torch.tensor([[4, 1, 7], [2, -1, -1], [0, 0, 0]], dtype=torch.int32)
    md = NS(block_table_tensor=table, seq_lens=seq_lens)
    scope = dict(dk=dk, self=attn, hidden_states=hidden_states, positions=positions, cos_sin=cos_sin,
                 num_reqs=B, num_query_per_req=S, k_cache=k_cache, v_cache=v_cache, md=md)
    exec(snippet("DFlashQwen3Attention.forward"), scope)

    qkv = hidden_states @ wqkv.T
    q = qkv[:, :Hq * D].reshape(T, Hq, D).contiguous()
    k = qkv[:, Hq * D:(Hq + Hkv) * D].reshape(T, Hkv, D).contiguous()
    v = qkv[:, (Hq + Hkv) * D:].reshape(T, Hkv, D).contiguous()
    dk.norm_rope(q, k, positions, cos_sin, q_norm_weight=attn.q_norm.weight,
                 k_norm_weight=attn.k_norm.weight, eps=1e-6, rope_style="gptj")
    want = dk.block_attention(q[:B * S].reshape(B, S, Hq, D), k_cache, v_cache, table[:B],
                              seq_lens[:B] - S, k[:B * S].reshape(B, S, Hkv, D),
                              v[:B * S].reshape(B, S, Hkv, D), sm_scale=D ** -0.5)
    assert scope["out"].shape == (B, S, Hq, D)
    assert torch.equal(scope["out"], want)
    assert not want.isnan().any()


def test_vllm_verify_chain_snippet():
    # vLLM's MRV2 flat layout: logits rows of every request back to back (cu_num_logits),
    # per-request sampling state indexed through idx_mapping; compared with the padded call.
    g = torch.Generator().manual_seed(2)
    V, steps, rows = 40, 3, [3, 1, 4]
    B, S, T = len(rows), steps + 1, sum(rows)
    cu = torch.tensor([0] + rows).cumsum(0)
    n_tok = T + 2                                     # two batch tokens without logits
    logits_indices = torch.tensor([0, 1, 2, 4, 5, 6, 7, 9])
    input_ids = torch.randint(0, V, (n_tok,), generator=g)
    tok_pos = torch.randint(0, 1000, (n_tok,), generator=g)
    logits = torch.randn(T, V, generator=g)
    for r in range(T):                                # make drafts likely to be accepted
        logits[r, input_ids[logits_indices[(r + 1) % T]]] += 4.0
    state = NS(temperature=NS(gpu=torch.tensor([0.7, 1.3, 0.0, 1.0, 0.9])),
               seeds=NS(gpu=torch.randint(0, 2 ** 40, (5,), generator=g)),
               top_k=NS(gpu=torch.tensor([5, 0, 3, 40, 7], dtype=torch.int32)),
               top_p=NS(gpu=torch.tensor([0.9, 1.0, 0.5, 0.8, 0.95])))
    ib = NS(idx_mapping=torch.tensor([3, 0, 4]), positions=tok_pos,
            logits_indices=logits_indices, input_ids=input_ids, cu_num_logits=cu)
    scope = dict(dk=dk, torch=torch, input_batch=ib, sampler=NS(sampling_states=state),
                 logits=logits, num_speculative_steps=steps, do_top_k=True, do_top_p=True)
    exec(snippet("cu_rows=ib.cu_num_logits"), scope)

    idx = ib.idx_mapping
    lp = torch.full((B, S, V), float("nan"))
    bt = torch.full((B, S), -1, dtype=torch.int64)
    ids = input_ids[logits_indices]
    for b in range(B):
        lp[b, :rows[b]] = logits[cu[b]:cu[b + 1]]
        bt[b, :rows[b]] = ids[cu[b]:cu[b + 1]]
    want = dk.verify_chain(lp, bt, num_drafts=torch.tensor(rows, dtype=torch.int32) - 1,
                           temperature=state.temperature.gpu[idx],
                           seeds=state.seeds.gpu[idx],
                           positions=tok_pos[logits_indices][cu[:-1]],
                           top_k=state.top_k.gpu[idx], top_p=state.top_p.gpu[idx],
                           filter_order="sequential")
    assert torch.equal(scope["sampled"], want.out_tokens)
    assert torch.equal(scope["num_sampled"], want.accept_len + 1)
    assert int(want.accept_len.max()) > 0


def test_sglang_kv_append_snippet():
    # SGLang's DFlashWorker KV append: per-layer fused qkv weights sliced at load, a token
    # pool (page size 1, [size + 1, Hkv, D] per layer with a dummy first slot), slots gathered
    # from req_to_token.
    g = torch.Generator().manual_seed(3)
    dt = torch.bfloat16
    L, Hq, Hkv, D, H, K, size = 2, 4, 1, 64, 64, 2, 12
    q_size, kv_size = Hq * D, Hkv * D
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(64).float()[:, None] * inv[None]
    rotary = NS(cos_sin_cache=torch.cat([ang.cos(), ang.sin()], -1).to(dt), is_neox_style=True)
    layers = [NS(self_attn=NS(q_size=q_size, kv_size=kv_size, rotary_emb=rotary,
                              qkv_proj=NS(weight=(torch.randn(q_size + 2 * kv_size, H,
                                                              generator=g) / 8).to(dt)),
                              k_norm=NS(weight=torch.rand(D, generator=g).to(dt) + 0.5),
                              attn=NS(layer_id=3 - i)))           # pool index != layer order
              for i in range(L)]
    draft = NS(layers=layers, fc=NS(weight=(torch.randn(H, K * H, generator=g) / H).to(dt)),
               hidden_norm=NS(weight=torch.rand(H, generator=g).to(dt) + 0.5,
                              variance_epsilon=1e-6))
    pool = NS(k_buffer=[torch.full((size + 1, Hkv, D), 3.0, dtype=dt) for _ in range(4)],
              v_buffer=[torch.full((size + 1, Hkv, D), 3.0, dtype=dt) for _ in range(4)])
    req_to_token = torch.tensor([[5, 6, 7, 8], [2, 11, 9, 1]], dtype=torch.int32)
    ctx_cache_loc = torch.cat([req_to_token[0, 1:3], req_to_token[1, :3]]).to(torch.int64)
    ctx_positions = torch.tensor([1, 2, 0, 1, 2])
    target_hidden = torch.randn(5, K * H, generator=g).to(dt)
    before = [b.clone() for b in pool.k_buffer + pool.v_buffer]
    worker = NS(draft_model_runner=NS(token_to_kv_pool=pool))
    exec(snippet("_append_target_hidden_to_draft_kv"),
         dict(dk=dk, torch=torch, draft=draft, self=worker, ctx_positions=ctx_positions,
              ctx_cache_loc=ctx_cache_loc, draft_input=NS(target_hidden=target_hidden)))

    hidden = dk.fuse_target_features(target_hidden, draft.fc.weight, draft.hidden_norm.weight,
                                     eps=1e-6)
    for i, layer in enumerate(layers):
        a, pid = layer.self_attn, 3 - i
        w = a.qkv_proj.weight
        kc, vc = before[pid].clone().unsqueeze(1), before[4 + pid].clone().unsqueeze(1)
        dk.inject_kv(hidden, w[q_size:].reshape(1, 2, kv_size, H), a.k_norm.weight[None],
                     ctx_positions, ctx_cache_loc, [kc], [vc], rotary.cos_sin_cache.float(),
                     rope_style="neox")
        assert torch.equal(pool.k_buffer[pid], kc[:, 0])
        assert torch.equal(pool.v_buffer[pid], vc[:, 0])
        assert not torch.equal(pool.k_buffer[pid], before[pid])
    for pid in (0, 1):                                # pool layers of no draft layer
        assert torch.equal(pool.k_buffer[pid], before[pid])
        assert torch.equal(pool.v_buffer[pid], before[4 + pid])


def test_sglang_verify_snippets():
    # compute_dflash_correct_drafts_and_bonus (greedy) and the sampled variant (joint
    # filters): SGLang's flat [bs*S, V] logits, candidates [bs, S], int32 seq_lens.
    g = torch.Generator().manual_seed(4)
    bs, S, V = 3, 4, 30
    candidates = torch.randint(0, V, (bs, S), generator=g)
    flat = torch.randn(bs * S, V, generator=g)
    flat.view(bs, S, V)[:, :-1].scatter_add_(-1, candidates[:, 1:, None], torch.full((bs, S - 1, 1), 5.0))
    seq_lens = torch.tensor([9, 17, 4], dtype=torch.int32)
    greedy = dict(dk=dk, torch=torch, logits_output=NS(next_token_logits=flat),
                  candidates=candidates, batch=NS(seq_lens=seq_lens), bs=bs, S=S)
    exec(snippet("logits_output.next_token_logits.view(bs, S, -1)"), greedy)
    want = dk.verify_chain(flat.reshape(bs, S, V), candidates, seq_lens=seq_lens)
    assert torch.equal(greedy["correct_len"], want.accept_len)
    assert greedy["bonus"].dtype == torch.int64 and torch.equal(greedy["bonus"], want.bonus.long())
    assert int(want.accept_len.max()) > 0

    si = NS(temperatures=torch.tensor([[0.8], [1.0], [1.5]]), need_top_k_sampling=True,
            top_ks=torch.tensor([4, 30, 1]), need_top_p_sampling=True,
            top_ps=torch.tensor([0.9, 0.5, 1.0]))
    seeds = torch.tensor([11, 12, 13])
    sampled = dict(dk=dk, torch=torch, batch=NS(sampling_info=si, seq_lens=seq_lens),
                   next_token_logits=flat, candidates=candidates, request_seeds=seeds, bs=bs, S=S)
    exec(snippet('filter_order="joint"'), sampled)
    want = dk.verify_chain(flat.reshape(bs, S, V), candidates, temperature=si.temperatures[:, 0],
                           top_k=si.top_ks.int(), top_p=si.top_ps, seeds=seeds,
                           positions=seq_lens.long(), seq_lens=seq_lens, filter_order="joint")
    assert torch.equal(sampled["correct_len"], want.accept_len)
    assert torch.equal(sampled["bonus"], want.bonus.long())


def test_sglang_draft_attention_snippet():
    # SGLang's DFlashAttention with a token pool: req_to_token rows are a page-size-1 block
    # table, narrowed to a host-known bound; the pool's buffers viewed as [slots, 1, Hkv, D].
    g = torch.Generator().manual_seed(5)
    dt = torch.bfloat16
    bs, S, Hq, Hkv, D, H, size = 2, 3, 2, 1, 64, 64, 20
    wqkv = (torch.randn((Hq + 2 * Hkv) * D, H, generator=g) / 8).to(dt)
    attn = NS(q_size=Hq * D, kv_size=Hkv * D, head_dim=D, num_heads=Hq, num_kv_heads=Hkv,
              qkv_proj=lambda x: (x @ wqkv.T, None),
              q_norm=NS(weight=torch.rand(D, generator=g).to(dt) + 0.5, variance_epsilon=1e-6),
              k_norm=NS(weight=torch.rand(D, generator=g).to(dt) + 0.5),
              rotary_emb=NS(is_neox_style=True), scaling=D ** -0.5)
    hidden_states = torch.randn(bs * S, H, generator=g).to(dt)
    positions = torch.tensor([5, 6, 7, 2, 3, 4])
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(64).float()[:, None] * inv[None]
    cos_sin = torch.cat([ang.cos(), ang.sin()], -1)
    k_buf = torch.randn(size, Hkv, D, generator=g).to(dt)
    v_buf = torch.randn(size, Hkv, D, generator=g).to(dt)
    req_to_token = torch.randint(1, size, (4, 16), generator=g, dtype=torch.int32)
    prefix = torch.tensor([5, 2], dtype=torch.int32)
    scope = dict(dk=dk, self=attn, hidden_states=hidden_states, positions=positions,
                 cos_sin=cos_sin, bs=bs, S=S, k_caches=[None, k_buf.unsqueeze(1)],
                 v_caches=[None, v_buf.unsqueeze(1)], i=1, draft_req_to_token=req_to_token,
                 forward_batch=NS(req_pool_indices=torch.tensor([3, 1])), max_len=8,
                 draft_prefix_lens=prefix)
    exec(snippet("DFlashAttention.forward"), scope)

    qkv = hidden_states @ wqkv.T
    q = qkv[:, :Hq * D].reshape(-1, Hq, D).contiguous()
    k = qkv[:, Hq * D:(Hq + Hkv) * D].reshape(-1, Hkv, D).contiguous()
    v = qkv[:, (Hq + Hkv) * D:].reshape(-1, Hkv, D).contiguous()
    dk.norm_rope(q, k, positions, cos_sin, q_norm_weight=attn.q_norm.weight,
                 k_norm_weight=attn.k_norm.weight, eps=1e-6, rope_style="neox")
    # Dense attention from first principles: each request's context tokens, then its block.
    for b, r in enumerate((3, 1)):
        ctx = req_to_token[r, :int(prefix[b])].long()
        keys = torch.cat([k_buf[ctx], k[b * S:(b + 1) * S]]).float()      # [n, Hkv, D]
        vals = torch.cat([v_buf[ctx], v[b * S:(b + 1) * S]]).float()
        qs = q[b * S:(b + 1) * S].float()                                  # [S, Hq, D]
        kk = keys.repeat_interleave(Hq // Hkv, 1)
        vv = vals.repeat_interleave(Hq // Hkv, 1)
        p = torch.einsum("shd,nhd->hsn", qs, kk).mul(D ** -0.5).softmax(-1)
        want = torch.einsum("hsn,nhd->shd", p, vv)
        torch.testing.assert_close(scope["out"][b].float(), want, atol=2e-2, rtol=2e-2)
