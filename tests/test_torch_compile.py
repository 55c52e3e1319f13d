"""Every public op traces under torch.compile(fullgraph=True) and gives the
eager result: the custom ops' fake implementations and mutation declarations
are what makes this work."""

import pytest
import torch

import dflash_kernels as dk


def _inputs(device):
    g = torch.Generator().manual_seed(1)
    B, S, Hq, Hkv, D, page, P, H, L, V = 2, 4, 4, 2, 64, 4, 8, 32, 2, 40
    r = lambda *s, dt=torch.float16: torch.randn(*s, generator=g).to(dt).to(device)  # noqa: E731
    N = B * S
    return dict(
        q=r(B, S, Hq, D), k_block=r(B, S, Hkv, D), v_block=r(B, S, Hkv, D),
        block_table=torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=device),
        context_lens=torch.tensor([5, 9], dtype=torch.int32, device=device),
        feats=[r(N, H), r(N, H)], fc=r(H, 2 * H) * 0.1, norm=r(H),
        kv_weight=r(L, 2, Hkv * D, H) * 0.1, k_norm=r(L, D),
        positions=torch.arange(N, dtype=torch.int64, device=device) + 9,
        slots=torch.tensor([12, 13, -1, 20, 21, 22, -1, -1], dtype=torch.int64, device=device),
        cos_sin=r(64, D, dt=torch.float32),
        k_write=r(N, L, Hkv, D), v_write=r(N, L, Hkv, D),
        logits=r(B, S, V, dt=torch.float32),
        tokens=torch.randint(0, V, (B, S), generator=g).to(torch.int32).to(device),
        temperature=torch.tensor([0.0, 0.8], device=device),
        seeds=torch.tensor([7, 8], dtype=torch.int64, device=device),
        pos=torch.tensor([5, 9], dtype=torch.int64, device=device),
        seq_lens=torch.tensor([6, 10], dtype=torch.int32, device=device),
        caches=[torch.zeros(L, P, page, Hkv, D, dtype=torch.float16, device=device) for _ in range(4)],
    )


def step(x, backend):
    kc, vc, kc2, vc2 = x["caches"]
    # the attention reads the cache the injection writes: ordering must survive tracing
    hidden = dk.fuse_target_features(x["feats"], x["fc"], x["norm"], backend=backend)
    dk.inject_kv(hidden, x["kv_weight"], x["k_norm"], x["positions"], x["slots"], kc, vc,
                 x["cos_sin"], backend=backend)
    dk.write_kv(x["k_write"], x["v_write"], x["k_norm"], x["positions"], x["slots"], list(kc2),
                list(vc2), x["cos_sin"], rope_style="gptj", backend=backend)
    out, lse = dk.block_attention(x["q"], kc[0], vc[0], x["block_table"], x["context_lens"],
                                  x["k_block"], x["v_block"], return_lse=True, backend=backend)
    res = dk.verify_chain(x["logits"], x["tokens"], temperature=x["temperature"], seeds=x["seeds"],
                          positions=x["pos"], seq_lens=x["seq_lens"], backend=backend)
    return hidden, out, lse, res.accept_len, res.out_tokens, res.bonus, res.new_seq_lens


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fullgraph_compile_matches_eager(backend, device):
    eager_in, compiled_in = _inputs(device), _inputs(device)
    expected = step(eager_in, backend)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(compiled_in, backend)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, equal_nan=True)
    for e, g in zip(eager_in["caches"], compiled_in["caches"]):
        torch.testing.assert_close(g, e, equal_nan=True)
    # the injected slots really were written
    assert compiled_in["caches"][0].abs().sum() > 0
