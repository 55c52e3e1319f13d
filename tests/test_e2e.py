"""End to end: DFlash speculative decoding built from the public ops is lossless.

The target (dflash_kernels.testing.model) runs in float64 with its own paged
attention, so a verify pass over S tokens and S one-token passes give logits
that agree to ~1e-14: argmax and Gumbel-max decisions do not flip between the
loops (verify_chain reads the logits cast to fp32; a flip needs two scores
within an fp32 ulp). The drafter runs in fp16 through block_attention,
fuse_target_features and inject_kv; its drafts only change how many tokens a
step commits, never which.
"""

import math

import pytest
import torch

from dflash_kernels import _registry
from dflash_kernels.testing import (
    DFlashDrafter,
    DrafterConfig,
    Engine,
    OracleDrafter,
    TargetConfig,
    TinyQwen3,
    slots_of,
)

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

OPS = ("block_attention", "fuse_target_features", "inject_kv", "verify_chain")


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls: OpenMP threads only add spin-wait overhead, and on a loaded
    # 2-core CI box (pytest-xdist) they oversubscribe the cores ~20x.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _backend_or_skip(name):
    if name == "auto":
        if not HAS_CUDA:
            pytest.skip("auto picks the Triton interpreter on CPU; covered by 'triton'")
        return None
    dev = torch.device(DEVICE).type
    missing = [op for op in OPS if not _registry.is_available(op, name, dev)]
    if missing:
        pytest.skip(f"backend {name} lacks {missing} on {dev}")
    return name


def _requests(n, max_prompt, vocab, greedy_only, seed):
    gen = torch.Generator().manual_seed(seed)
    lens = [1 + int(x) for x in torch.randint(0, max_prompt, (n,), generator=gen)]
    lens[0] = max_prompt  # one long prompt, so padding is exercised
    prompts = [torch.randint(1, vocab, (L,), generator=gen).tolist() for L in lens]
    if greedy_only:
        temps = [0.0] * n
    else:
        temps = [0.0 if b % 2 == 0 else [0.7, 1.0, 1.6][b % 3] for b in range(n)]
    seeds = torch.randint(-2 ** 62, 2 ** 62, (n,), generator=gen).tolist()
    return prompts, temps, seeds


def _models(layers=3, capture=(0, 2), draft_layers=2, S=8, vocab=512, seed=0):
    target = TinyQwen3(TargetConfig(vocab_size=vocab, num_layers=layers, capture_layers=capture,
                                    seed=seed), device=DEVICE)
    dcfg = DrafterConfig(num_layers=draft_layers, block_size=S, mask_token_id=vocab - 1, seed=seed + 1)
    return target, dcfg


# ----------------------------------------------------------------------------
# The target model itself, against dense causal math without a cache.
# ----------------------------------------------------------------------------

def _dense_logits(t: TinyQwen3, tokens):
    """Independent math: one sequence, no paging, per-head loops."""
    c = t.cfg
    T, D, g = len(tokens), c.head_dim, c.num_heads // c.num_kv_heads
    pos = torch.arange(T, device=t.device)
    cs = t.cos_sin_cache[pos].double()
    cos, sin = cs[:, :D // 2], cs[:, D // 2:]

    def norm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.eps) * w

    def rope(x):  # [T, D]
        a, b = x[:, :D // 2], x[:, D // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    x = t.embed[torch.tensor(tokens, device=t.device)]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=t.device))
    for layer in t.layers:
        h = norm(x, layer.ln1)
        q, k, v = h @ layer.wq.T, h @ layer.wk.T, h @ layer.wv.T
        heads = []
        for hq in range(c.num_heads):
            hk = hq // g
            qh = rope(norm(q[:, hq * D:(hq + 1) * D], layer.q_norm))
            kh = rope(norm(k[:, hk * D:(hk + 1) * D], layer.k_norm))
            s = (qh @ kh.T) / math.sqrt(D)
            s = s.masked_fill(~causal, float("-inf"))
            heads.append(torch.softmax(s, -1) @ v[:, hk * D:(hk + 1) * D])
        x = x + torch.cat(heads, -1) @ layer.wo.T
        h = norm(x, layer.ln2)
        x = x + (torch.nn.functional.silu(h @ layer.w_gate.T) * (h @ layer.w_up.T)) @ layer.w_down.T
    return norm(x, t.final_norm) @ t.lm_head.T


def test_target_paged_cache_matches_dense_math():
    target, _ = _models()
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 2, 9, 11, 6, 1]]
    eng = Engine(target, None, page_size=4)
    st = eng._start(prompts, max_new=6, temperature=[0.0, 0.0], seeds=[0, 0], block_size=3)
    B, T = 2, 11
    toks = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        toks[b, :len(p)] = torch.tensor(p)
    toks = toks.to(DEVICE)
    pos = torch.arange(T, device=DEVICE)[None].expand(B, T)
    valid = pos < st.prompt_lens[:, None]
    slots = torch.where(valid, slots_of(st.block_table, pos, 4), 0)
    logits, feats = target.forward(toks, pos, slots, st.block_table, st.k_cache, st.v_cache,
                                   lengths=st.prompt_lens)
    assert len(feats) == 2 and feats[0].shape == (B, T, target.cfg.hidden_size)
    # Then a 3-token causal block after each prompt, over the cache.
    ext = [[3, 8, 1], [2, 2, 7]]
    bpos = st.prompt_lens[:, None] + torch.arange(3, device=DEVICE)
    btok = torch.tensor(ext, device=DEVICE)
    blogits, _ = target.forward(btok, bpos, slots_of(st.block_table, bpos, 4), st.block_table,
                                st.k_cache, st.v_cache)
    for b, p in enumerate(prompts):
        want = _dense_logits(target, p + ext[b])
        torch.testing.assert_close(logits[b, :len(p)], want[:len(p)], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(blogits[b], want[len(p):], rtol=1e-10, atol=1e-10)


def test_plain_loop_samples_with_the_spec_key():
    """Generated token i of a request (at position P+i) is the greedy argmax or
    the Gumbel-max keyed by (seed, P+i) of the target's row at position P+i-1:
    SPEC's key, recomputed here from dense logits and the noise module."""
    from dflash_kernels import noise
    target, _ = _models()
    prompts, temps, seeds = _requests(4, 9, target.cfg.vocab_size, False, seed=7)
    max_new = 12
    res = Engine(target, None, page_size=8, backend="reference").generate_plain(prompts, max_new, temps, seeds)
    toks = res.tokens.cpu()
    ids = torch.arange(target.cfg.vocab_size)
    for b, p in enumerate(prompts):
        seq = list(p) + toks[b].tolist()
        logits = _dense_logits(target, seq[:-1]).float().cpu()
        for i in range(max_new):
            row = logits[len(p) + i - 1]
            if temps[b] > 0:
                inv_t = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(temps[b], dtype=torch.float32)
                g = noise.gumbel(torch.tensor(seeds[b]), torch.tensor(len(p) + i), ids)
                want = int(torch.argmax(row * inv_t + g))
            else:
                want = int(torch.argmax(row))
            assert int(toks[b, i]) == want, (b, i)


# ----------------------------------------------------------------------------
# Lossless: speculative == plain, token for token, for every backend.
# ----------------------------------------------------------------------------

def _check_oracle_history(hist, corrupt, S, max_new):
    """Request b with draft c flipped (S: none) accepts exactly c-1 drafts per step
    while the oracle knows its drafts, and is active for ceil((max_new-1)/c) steps."""
    totals = []
    for b, c in enumerate(corrupt):
        c = S if c is None else c
        n_full, total = (max_new - 1) // c, math.ceil((max_new - 1) / c)
        col = hist[:, b]
        assert bool((col[:n_full] == c - 1).all()), (b, c, col)
        assert bool((col[:total] >= 0).all()) and bool((col[total:] == -1).all()), (b, c, col)
        totals.append(total)
    assert hist.shape[0] == max(totals)


def _check_emitted(spec, max_new, S):
    hist = spec.accept_lens
    emitted = 1 + (hist.clamp(min=0) + (hist >= 0)).sum(0)
    assert bool((emitted >= max_new).all()) and bool((emitted < max_new + S).all()), hist


@pytest.mark.parametrize("drafter", ["dflash", "oracle"])
@pytest.mark.parametrize("greedy_only", [True, False], ids=["greedy", "mixed_sampling"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_speculative_equals_plain(backend, greedy_only, drafter):
    backend = _backend_or_skip(backend)
    target, dcfg = _models()
    S, B, max_new = dcfg.block_size, 4, 26
    prompts, temps, seeds = _requests(B, 13, target.cfg.vocab_size, greedy_only, seed=3)
    plain = Engine(target, None, page_size=8, backend=backend).generate_plain(prompts, max_new, temps, seeds)
    assert plain.tokens.shape == (B, max_new)
    assert bool((plain.tokens >= 0).all()) and bool((plain.tokens < target.cfg.vocab_size).all())
    corrupt = [None, 1, 3, S - 1]
    if drafter == "oracle":
        d = OracleDrafter(target, dcfg, plain.tokens, corrupt_at=corrupt)
    else:
        d = DFlashDrafter(target, dcfg)
    spec = Engine(target, d, page_size=8, backend=backend).generate_speculative(prompts, max_new, temps, seeds)
    torch.testing.assert_close(spec.tokens, plain.tokens, rtol=0, atol=0)
    _check_emitted(spec, max_new, S)
    if drafter == "oracle":
        _check_oracle_history(spec.accept_lens, corrupt, S, max_new)
    if not greedy_only:
        # Sampled rows really sampled: they differ from the greedy decode of the same prompts.
        greedy = Engine(target, None, page_size=8, backend=backend).generate_plain(
            prompts, max_new, [0.0] * B, seeds)
        sampled = torch.tensor([t > 0 for t in temps], device=DEVICE)
        differs = (greedy.tokens != plain.tokens).any(1)
        assert bool(differs[sampled].all()) and not bool(differs[~sampled].any())


@pytest.mark.interpreter  # deselect with -m "not interpreter" (or -k "not triton")
@pytest.mark.parametrize("greedy_only", [True, False], ids=["greedy", "mixed_sampling"])
def test_speculative_equals_plain_triton(greedy_only):
    """Every op on the Triton backend (the interpreter on CPU: a tiny run). The
    drafter's block_attention output and injected caches are also compared with
    the reference backend on the run's final state."""
    backend = _backend_or_skip("triton")
    target, dcfg = _models(layers=2, capture=(0, 1), draft_layers=1, S=4, vocab=128)
    S, max_new = dcfg.block_size, (7 if not HAS_CUDA else 24)
    prompts, temps, seeds = _requests(2, 6, target.cfg.vocab_size, greedy_only, seed=5)
    plain = Engine(target, None, page_size=4, backend="reference").generate_plain(
        prompts, max_new, temps, seeds)
    corrupt = [None, 2]
    drafter = OracleDrafter(target, dcfg, plain.tokens, corrupt_at=corrupt)
    eng = Engine(target, drafter, page_size=4, backend=backend)
    spec = eng.generate_speculative(prompts, max_new, temps, seeds)
    torch.testing.assert_close(spec.tokens, plain.tokens, rtol=0, atol=0)
    _check_oracle_history(spec.accept_lens, corrupt, S, max_new)
    _check_draft_cache(eng, prompts)
    st = eng.state
    got = drafter.draft_logits(st.anchor, st.seq_len, st.block_table, st.dk_cache, st.dv_cache,
                               backend=backend)
    want = drafter.draft_logits(st.anchor, st.seq_len, st.block_table, st.dk_cache, st.dv_cache,
                                backend="reference")
    assert bool(got.isfinite().all())
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)


# ----------------------------------------------------------------------------
# Acceptance statistics of a real (random-weight) drafter.
# ----------------------------------------------------------------------------

def test_random_drafter_accepts_few():
    """A random drafter agrees with a random target about as often as chance
    (the oracle cases above accept whole blocks)."""
    target, dcfg = _models(S=8)
    prompts, _, seeds = _requests(4, 9, target.cfg.vocab_size, False, seed=13)
    max_new = 20
    spec = Engine(target, DFlashDrafter(target, dcfg), page_size=8, backend="reference").generate_speculative(
        prompts, max_new, [1.0] * 4, seeds)
    _check_emitted(spec, max_new, dcfg.block_size)
    assert float(spec.accepted_per_step().mean()) < 1.0, spec.accept_lens
    assert spec.steps >= (max_new - 1) // 2


# ----------------------------------------------------------------------------
# The draft cache holds exactly the committed tokens' context K/V.
# ----------------------------------------------------------------------------

def _dense_draft_logits(d, feats, anchor):
    """Independent float64 DFlash draft pass of one request: context K/V from
    the captured features (positions 0..n-1), block [anchor, MASK...] at
    n..n+S-1, every block row attending to all context and block keys."""
    c, tc = d.cfg, d.target.cfg
    S, D, g = c.block_size, c.head_dim, c.num_heads // c.num_kv_heads
    f64 = lambda t: t.double()  # noqa: E731

    def norm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.eps) * f64(w)

    def rope(x, pos):  # [T, D]
        cs = d.cos_sin_cache[pos].double()
        cos, sin = cs[:, :D // 2], cs[:, D // 2:]
        a, b = x[:, :D // 2], x[:, D // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    n = feats[0].shape[0]
    ctx = norm(torch.cat([f64(f.half()) for f in feats], -1) @ f64(d.fc_weight).T, d.hidden_norm)
    ctx = f64(ctx.half())  # the op hands fp16 features to inject_kv
    tokens = torch.full((S,), c.mask_token_id, dtype=torch.long, device=ctx.device)
    tokens[0] = anchor
    x = f64(d.embed[tokens])
    cpos = torch.arange(n, device=ctx.device)
    bpos = n + torch.arange(S, device=ctx.device)
    for li in range(c.num_layers):
        wk, wv = f64(d.kv_weight[li, 0]), f64(d.kv_weight[li, 1])
        h = norm(x, d.ln1[li])
        q, kb, vb = h @ f64(d.wq[li]).T, h @ wk.T, h @ wv.T
        kc, vc = ctx @ wk.T, ctx @ wv.T
        heads = []
        for hq in range(c.num_heads):
            hk = slice((hq // g) * D, (hq // g + 1) * D)
            qh = rope(norm(q[:, hq * D:(hq + 1) * D], d.q_norm[li]), bpos)
            keys = torch.cat([rope(norm(kc[:, hk], d.k_norm[li]), cpos),
                              rope(norm(kb[:, hk], d.k_norm[li]), bpos)])
            vals = torch.cat([vc[:, hk], vb[:, hk]])
            heads.append(torch.softmax(qh @ keys.T / math.sqrt(D), -1) @ vals)
        x = x + torch.cat(heads, -1) @ f64(d.wo[li]).T
        h = norm(x, d.ln2[li])
        x = x + (torch.nn.functional.silu(h @ f64(d.w_gate[li]).T) * (h @ f64(d.w_up[li]).T)) @ f64(d.w_down[li]).T
    return norm(x[1:], d.final_norm) @ f64(d.lm_head).T


def _check_draft_cache(eng, prompts):
    """The draft cache equals a fresh reference injection of the committed
    sequences at their slots; every other slot is still NaN (rejected rows and
    padding were never injected)."""
    target, drafter, st, ps = eng.target, eng.drafter, eng.state, eng.page_size
    out, seq_len, gen = st.out.cpu(), st.seq_len.cpu(), st.generated.cpu()
    num_pages = st.k_cache.shape[1]
    written = torch.zeros(num_pages * ps, dtype=torch.bool, device=DEVICE)
    dense_ctx = []
    for b, p in enumerate(prompts):
        n = int(seq_len[b])
        assert n == len(p) + int(gen[b]) - 1
        committed = list(p) + out[b, :n - len(p)].tolist()
        pos = torch.arange(n, device=DEVICE)
        table = st.block_table[b:b + 1]
        slots = slots_of(table, pos[None], ps)
        k0, v0 = target.new_cache(num_pages, ps)
        _, feats = target.forward(torch.tensor([committed], device=DEVICE), pos[None], slots, table, k0, v0)
        kd, vd = drafter.new_cache(num_pages, ps)
        drafter.inject([f[0] for f in feats], pos, slots[0], kd, vd, backend="reference")
        for got, want in ((st.dk_cache, kd), (st.dv_cache, vd)):
            torch.testing.assert_close(got.flatten(1, 2)[:, slots[0]].float(),
                                       want.flatten(1, 2)[:, slots[0]].float(), rtol=2e-2, atol=2e-2)
        written[slots[0]] = True
        dense_ctx.append([f[0] for f in feats])
    # The draft pass over the final state, against dense float64 math.
    got = drafter.draft_logits(st.anchor, st.seq_len, st.block_table, st.dk_cache, st.dv_cache,
                               backend=eng.backend)
    for b in range(len(prompts)):
        want = _dense_draft_logits(drafter, dense_ctx[b], int(st.anchor[b]))
        torch.testing.assert_close(got[b].double(), want, rtol=1e-2, atol=3e-2)
    for cache in (st.dk_cache, st.dv_cache):
        assert bool(cache.flatten(1, 2)[:, ~written].isnan().all())


def test_draft_cache_holds_exactly_the_committed_context():
    target, dcfg = _models(S=8)
    prompts, temps, seeds = _requests(3, 9, target.cfg.vocab_size, False, seed=17)
    eng = Engine(target, DFlashDrafter(target, dcfg), page_size=8, backend="reference")
    eng.generate_speculative(prompts, 20, temps, seeds)
    _check_draft_cache(eng, prompts)
