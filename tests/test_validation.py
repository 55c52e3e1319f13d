"""One test per host-side validation rule of the public ops.

Each case starts from a valid call, breaks one argument, and expects a
ValueError whose message names that argument. The valid calls themselves
run on the reference backend, so a rule that rejects good input shows too.
"""

import pytest
import torch

import dflash_kernels as dk

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
I32, I64 = torch.int32, torch.int64
E4M3 = torch.float8_e4m3fn


# -------------------------------------------------------------- attention
def attention_args():
    B, S, Hq, Hkv, D, P, page = 2, 4, 4, 2, 64, 6, 8
    return dict(
        q=torch.randn(B, S, Hq, D, dtype=F16),
        k_cache=torch.randn(P, page, Hkv, D, dtype=F16),
        v_cache=torch.randn(P, page, Hkv, D, dtype=F16),
        block_table=torch.arange(B * 3, dtype=I32).view(B, 3),
        context_lens=torch.tensor([5, 17], dtype=I32),
        k_block=torch.randn(B, S, Hkv, D, dtype=F16),
        v_block=torch.randn(B, S, Hkv, D, dtype=F16),
    )


def _fp8_caches(a):
    a["k_cache"] = a["k_cache"].to(E4M3)
    a["v_cache"] = a["v_cache"].to(E4M3)


ATTENTION_CASES = {
    "q_rank": (lambda a: a.update(q=a["q"][0]), "q"),
    "q_dtype": (lambda a: a.update(q=a["q"].float()), "q"),
    "q_not_tensor": (lambda a: a.update(q=[1.0]), "q"),
    "head_dim": (lambda a: a.update(q=torch.randn(2, 4, 4, 32, dtype=F16),
                                    k_cache=torch.randn(6, 8, 2, 32, dtype=F16),
                                    v_cache=torch.randn(6, 8, 2, 32, dtype=F16),
                                    k_block=None, v_block=None), "head dim"),
    "q_last_stride": (lambda a: a.update(q=a["q"].transpose(2, 3).contiguous().transpose(2, 3)), "q"),
    "k_cache_rank": (lambda a: a.update(k_cache=a["k_cache"][0]), "k_cache"),
    "k_cache_dtype": (lambda a: a.update(k_cache=a["k_cache"].to(BF16)), "k_cache"),
    "k_cache_head_dim": (lambda a: a.update(k_cache=torch.randn(6, 8, 2, 128, dtype=F16),
                                            v_cache=torch.randn(6, 8, 2, 128, dtype=F16)), "k_cache"),
    "v_cache_shape": (lambda a: a.update(v_cache=a["v_cache"][:5]), "v_cache"),
    "v_cache_dtype": (lambda a: a.update(v_cache=a["v_cache"].to(E4M3), k_scale=1.0, v_scale=1.0), "v_cache"),
    "gqa_divisible": (lambda a: a.update(q=torch.randn(2, 4, 3, 64, dtype=F16)), "multiple"),
    "block_table_dtype": (lambda a: a.update(block_table=a["block_table"].long()), "block_table"),
    "block_table_rows": (lambda a: a.update(block_table=a["block_table"][:1]), "block_table"),
    "context_lens_dtype": (lambda a: a.update(context_lens=a["context_lens"].long()), "context_lens"),
    "context_lens_shape": (lambda a: a.update(context_lens=a["context_lens"][:1]), "context_lens"),
    "block_pair": (lambda a: a.update(v_block=None), "k_block, v_block"),
    "k_block_shape": (lambda a: a.update(k_block=a["k_block"][:, :3]), "k_block"),
    "v_block_dtype": (lambda a: a.update(v_block=a["v_block"].to(BF16)), "v_block"),
    "sm_scale": (lambda a: a.update(sm_scale=-1.0), "sm_scale"),
    "window_zero": (lambda a: a.update(window=0), "window"),
    "window_type": (lambda a: a.update(window=2.5), "window"),
    "fp8_needs_scale": (lambda a: _fp8_caches(a), "k_scale"),
    "scale_without_fp8": (lambda a: a.update(k_scale=1.0), "k_scale"),
    "scale_tensor_shape": (lambda a: (_fp8_caches(a), a.update(k_scale=torch.ones(2), v_scale=1.0)), "k_scale"),
    "scale_tensor_dtype": (lambda a: (_fp8_caches(a), a.update(k_scale=torch.ones(1, dtype=F16),
                                                               v_scale=1.0)), "k_scale"),
    "scale_negative": (lambda a: (_fp8_caches(a), a.update(k_scale=-2.0, v_scale=1.0)), "k_scale"),
    "scale_inf": (lambda a: (_fp8_caches(a), a.update(k_scale=1.0, v_scale=float("inf"))), "v_scale"),
    "scale_zero_in_fp32": (lambda a: (_fp8_caches(a), a.update(k_scale=1e-50, v_scale=1.0)), "k_scale"),
    "sm_scale_inf": (lambda a: a.update(sm_scale=float("inf")), "sm_scale"),
    "sm_scale_nan": (lambda a: a.update(sm_scale=float("nan")), "sm_scale"),
    "sm_scale_past_fp32": (lambda a: a.update(sm_scale=1e39), "sm_scale"),
    "sm_scale_huge_int": (lambda a: a.update(sm_scale=2 ** 1100), "sm_scale"),
    "out_aliases_q": (lambda a: a.update(out=a["q"]), "out, q|q, out"),
    "lse_aliases_out": (lambda a: a.update(out=torch.empty(2 * 4 * 4 * 64 * 2, dtype=F16)[:2 * 4 * 4 * 64]
                                           .view(2, 4, 4, 64), return_lse=True), None),
    "out_shape": (lambda a: a.update(out=torch.empty(2, 4, 4, 32, dtype=F16)), "out"),
    "out_dtype": (lambda a: a.update(out=torch.empty(2, 4, 4, 64, dtype=F32)), "out"),
    "out_contiguous": (lambda a: a.update(out=torch.empty(4, 2, 4, 64, dtype=F16).transpose(0, 1)), "out"),
    "lse_out_without_flag": (lambda a: a.update(lse_out=torch.empty(2, 4, 4)), "lse_out"),
    "lse_out_shape": (lambda a: a.update(return_lse=True, lse_out=torch.empty(2, 4)), "lse_out"),
}


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_block_attention_rejects(case):
    args = attention_args()
    breaker, needle = ATTENTION_CASES[case]
    if needle is None:  # a valid layout that looks close to an invalid one
        breaker(args)
        dk.block_attention(**args, backend="reference")
        return
    breaker(args)
    with pytest.raises(ValueError, match=needle):
        dk.block_attention(**args, backend="reference")


# ----------------------------------------------------------------- fuse
def fuse_args():
    N, H, K = 3, 64, 3
    return dict(features=torch.randn(N, K * H, dtype=F16),
                fc_weight=torch.randn(H, K * H, dtype=F16),
                norm_weight=torch.randn(H, dtype=F16))


FUSE_CASES = {
    "features_rank": (lambda a: a.update(features=a["features"][0]), "features"),
    "features_dtype": (lambda a: a.update(features=a["features"].float()), "features"),
    "features_empty_list": (lambda a: a.update(features=[]), "features"),
    "features_list_rows": (lambda a: a.update(features=[a["features"][:, :64], a["features"][:2, 64:]]),
                           r"features\[1\]"),
    "features_list_dtype": (lambda a: a.update(features=[a["features"][:, :64],
                                                         a["features"][:, 64:].to(BF16)]), r"features\[1\]"),
    "fc_weight_width": (lambda a: a.update(fc_weight=a["fc_weight"][:, :100]), "fc_weight"),
    "fc_weight_dtype": (lambda a: a.update(fc_weight=a["fc_weight"].to(BF16)), "fc_weight"),
    "norm_weight_shape": (lambda a: a.update(norm_weight=a["norm_weight"][:10]), "norm_weight"),
    "eps": (lambda a: a.update(eps=0.0), "eps"),
    "eps_inf": (lambda a: a.update(eps=float("inf")), "eps"),
    "out_shape": (lambda a: a.update(out=torch.empty(3, 32, dtype=F16)), "out"),
    "out_aliases_features": (lambda a: a.update(out=a["features"].view(-1)[:3 * 64].view(3, 64)),
                             "features"),
}


@pytest.mark.parametrize("case", sorted(FUSE_CASES))
def test_fuse_target_features_rejects(case):
    args = fuse_args()
    breaker, needle = FUSE_CASES[case]
    breaker(args)
    with pytest.raises(ValueError, match=needle):
        dk.fuse_target_features(**args, backend="reference")


# ------------------------------------------------------------- inject/write
def kv_common(N=5, L=2, Hkv=2, D=64, P=4, page=4):
    return dict(
        k_norm_weight=torch.ones(L, D, dtype=F16),
        positions=torch.arange(N, dtype=I64),
        slot_mapping=torch.arange(N, dtype=I64),
        k_cache=torch.zeros(L, P, page, Hkv, D, dtype=F16),
        v_cache=torch.zeros(L, P, page, Hkv, D, dtype=F16),
        cos_sin_cache=torch.randn(32, D),
    )


def inject_args():
    N, L, Hkv, D, H = 5, 2, 2, 64, 32
    a = kv_common(N, L, Hkv, D)
    a.update(hidden=torch.randn(N, H, dtype=F16), kv_weight=torch.randn(L, 2, Hkv * D, H, dtype=F16))
    return a


def write_args():
    N, L, Hkv, D = 5, 2, 2, 64
    a = kv_common(N, L, Hkv, D)
    a.update(k=torch.randn(N, L, Hkv, D, dtype=F16), v=torch.randn(N, L, Hkv, D, dtype=F16))
    return a


KV_COMMON_CASES = {
    "k_norm_shape": (lambda a: a.update(k_norm_weight=torch.ones(2, 32)), "k_norm_weight"),
    "positions_dtype": (lambda a: a.update(positions=a["positions"].int()), "positions"),
    "positions_shape": (lambda a: a.update(positions=a["positions"][:2]), "positions"),
    "slot_mapping_dtype": (lambda a: a.update(slot_mapping=a["slot_mapping"].int()), "slot_mapping"),
    "slot_mapping_shape": (lambda a: a.update(slot_mapping=a["slot_mapping"][:2]), "slot_mapping"),
    "k_cache_layers": (lambda a: a.update(k_cache=a["k_cache"][:1]), "k_cache"),
    "k_cache_rank": (lambda a: a.update(k_cache=a["k_cache"][0]), "k_cache"),
    "k_cache_dtype": (lambda a: a.update(k_cache=a["k_cache"].float()), "k_cache"),
    "k_cache_list_len": (lambda a: a.update(k_cache=list(a["k_cache"])[:1]), "k_cache"),
    "k_cache_list_shape": (lambda a: a.update(k_cache=[a["k_cache"][0], a["k_cache"][1][:2]]), r"k_cache\[1\]"),
    "k_cache_list_strides": (lambda a: a.update(k_cache=[a["k_cache"][0],
                                                         a["k_cache"][1].transpose(1, 2).contiguous().transpose(1, 2)]),
                             r"k_cache\[1\]"),
    "v_cache_shape": (lambda a: a.update(v_cache=a["v_cache"][:, :2]), "v_cache"),
    "v_cache_dtype": (lambda a: a.update(v_cache=a["v_cache"].to(E4M3)), "v_cache"),
    "fp8_needs_scale": (lambda a: a.update(k_cache=a["k_cache"].to(E4M3), v_cache=a["v_cache"].to(E4M3)),
                        "k_scale"),
    "scale_without_fp8": (lambda a: a.update(v_scale=0.5), "v_scale"),
    "rope_style": (lambda a: a.update(rope_style="llama"), "rope_style"),
    "rotary_dim_odd": (lambda a: a.update(rotary_dim=31), "rotary_dim"),
    "rotary_dim_large": (lambda a: a.update(rotary_dim=128), "rotary_dim"),
    "cos_sin_width": (lambda a: a.update(cos_sin_cache=torch.randn(32, 32)), "cos_sin_cache"),
    "cos_sin_dtype": (lambda a: a.update(cos_sin_cache=torch.randn(32, 64, dtype=F16)), "cos_sin_cache"),
    "eps": (lambda a: a.update(eps=-1.0), "eps"),
    "eps_inf": (lambda a: a.update(eps=float("inf")), "eps"),
    "k_cache_is_v_cache": (lambda a: a.update(v_cache=a["k_cache"]), "k_cache, v_cache|v_cache, k_cache"),
    "layers_share_a_cache": (lambda a: a.update(k_cache=[a["k_cache"][0], a["k_cache"][0]]),
                             r"k_cache\[0\], k_cache\[1\]"),
    "layer_dim_expanded": (lambda a: a.update(k_cache=a["k_cache"][:1].expand(2, -1, -1, -1, -1)),
                           "k_cache: the op writes it"),
    "pages_overlap": (lambda a: a.update(k_cache=a["k_cache"].as_strided(
        a["k_cache"].shape, (4 * 4 * 2 * 64, 2 * 2 * 64, 2 * 64, 64, 1))), "k_cache: the op writes it"),
    "cache_holds_positions": (lambda a: a.update(positions=a["k_cache"].view(torch.int64)[0, 0, 0, 0, :5]),
                              "positions"),
    "kv_interleaved_is_fine": (lambda a: _interleaved_kv(a), None),
}


def _interleaved_kv(a):
    """K and V as the two halves of one [L, P, 2, page, Hkv, D] buffer: disjoint, accepted."""
    kv = torch.zeros(2, 4, 2, 4, 2, 64, dtype=F16)
    a.update(k_cache=kv[:, :, 0], v_cache=kv[:, :, 1])


INJECT_CASES = dict(KV_COMMON_CASES, **{
    "hidden_rank": (lambda a: a.update(hidden=a["hidden"][0]), "hidden"),
    "hidden_dtype": (lambda a: a.update(hidden=a["hidden"].float()), "hidden"),
    "kv_weight_shape": (lambda a: a.update(kv_weight=a["kv_weight"][:, :1]), "kv_weight"),
    "kv_weight_rows": (lambda a: a.update(kv_weight=a["kv_weight"][:, :, :64]), "kv_weight"),
    "kv_weight_dtype": (lambda a: a.update(kv_weight=a["kv_weight"].to(BF16)), "kv_weight"),
    "kv_bias_shape": (lambda a: a.update(kv_bias=torch.zeros(2, 2, 64, dtype=F16)), "kv_bias"),
    "head_dim": (lambda a: a.update(kv_weight=torch.randn(2, 2, 64, 32, dtype=F16),
                                    k_norm_weight=None, cos_sin_cache=torch.randn(32, 32),
                                    k_cache=torch.zeros(2, 4, 4, 2, 32, dtype=F16),
                                    v_cache=torch.zeros(2, 4, 4, 2, 32, dtype=F16)), "head dim"),
})

WRITE_CASES = dict(KV_COMMON_CASES, **{
    "k_rank": (lambda a: a.update(k=a["k"][0]), "k"),
    "k_dtype": (lambda a: a.update(k=a["k"].float()), "k"),
    "v_shape": (lambda a: a.update(v=a["v"][:, :1]), "v"),
    "v_dtype": (lambda a: a.update(v=a["v"].to(BF16)), "v"),
    "k_cache_heads": (lambda a: a.update(k_cache=torch.zeros(2, 4, 4, 1, 64, dtype=F16),
                                         v_cache=torch.zeros(2, 4, 4, 1, 64, dtype=F16)), "k_cache"),
    "cache_head_dim": (lambda a: a.update(k_cache=torch.zeros(2, 4, 4, 2, 128, dtype=F16),
                                          v_cache=torch.zeros(2, 4, 4, 2, 128, dtype=F16)), "k_cache"),
    "k_inside_v_cache": (lambda a: a.update(k=a["v_cache"].view(-1)[:5 * 2 * 2 * 64].view(5, 2, 2, 64)),
                         "v_cache, k|k, v_cache"),
})


@pytest.mark.parametrize("op, make, case", [
    *[(dk.inject_kv, inject_args, c) for c in sorted(INJECT_CASES)],
    *[(dk.write_kv, write_args, c) for c in sorted(WRITE_CASES)],
], ids=lambda v: getattr(v, "__name__", v))
def test_inject_and_write_kv_reject(op, make, case):
    args = make()
    breaker, needle = (INJECT_CASES if op is dk.inject_kv else WRITE_CASES)[case]
    breaker(args)
    if needle is None:  # a valid layout that looks close to an invalid one
        op(**args, backend="reference")
        return
    with pytest.raises(ValueError, match=needle):
        op(**args, backend="reference")


# ----------------------------------------------------------------- verify
def verify_args():
    B, S, V = 3, 4, 50
    return dict(logits=torch.randn(B, S, V), block_tokens=torch.randint(0, V, (B, S), dtype=I32))


def sampled(a, **kw):
    B = a["block_tokens"].shape[0]
    a.update(temperature=torch.ones(B), seeds=torch.arange(B), positions=torch.arange(B) * 10)
    a.update(kw)


VERIFY_CASES = {
    "block_tokens_rank": (lambda a: a.update(block_tokens=a["block_tokens"][0]), "block_tokens"),
    "block_tokens_dtype": (lambda a: a.update(block_tokens=a["block_tokens"].float()), "block_tokens"),
    "logits_dtype": (lambda a: a.update(logits=a["logits"].double()), "logits"),
    "logits_rows": (lambda a: a.update(logits=a["logits"].view(12, 50)[:11]), "logits"),
    "logits_shape": (lambda a: a.update(logits=a["logits"][:, :3]), "logits"),
    "logits_stride": (lambda a: a.update(logits=a["logits"].transpose(1, 2).contiguous().transpose(1, 2)),
                      "logits"),
    "num_drafts_dtype": (lambda a: a.update(num_drafts=torch.zeros(3, dtype=I64)), "num_drafts"),
    "num_drafts_shape": (lambda a: a.update(num_drafts=torch.zeros(2, dtype=I32)), "num_drafts"),
    "top_k_without_temperature": (lambda a: a.update(top_k=torch.ones(3, dtype=I32)), "top_k"),
    "top_p_without_temperature": (lambda a: a.update(top_p=torch.ones(3)), "top_p"),
    "draft_probs_without_temperature": (lambda a: a.update(draft_probs=torch.rand(3, 3, 50)), "draft_probs"),
    "temperature_without_seeds": (lambda a: a.update(temperature=torch.ones(3)), "seeds"),
    "temperature_without_positions": (lambda a: a.update(temperature=torch.ones(3), seeds=torch.arange(3)),
                                      "positions"),
    "temperature_dtype": (lambda a: sampled(a, temperature=torch.ones(3, dtype=F16)), "temperature"),
    "seeds_dtype": (lambda a: sampled(a, seeds=torch.arange(3, dtype=I32)), "seeds"),
    "positions_shape": (lambda a: sampled(a, positions=torch.arange(2)), "positions"),
    "top_k_dtype": (lambda a: sampled(a, top_k=torch.ones(3)), "top_k"),
    "top_p_dtype": (lambda a: sampled(a, top_p=torch.ones(3, dtype=F16)), "top_p"),
    "draft_probs_shape": (lambda a: sampled(a, draft_probs=torch.rand(3, 4, 50)), "draft_probs"),
    "seq_lens_dtype": (lambda a: a.update(seq_lens=torch.zeros(3, dtype=I64)), "seq_lens"),
    "out_arity": (lambda a: a.update(out=(torch.empty(3, dtype=I32),)), "out"),
    "out_accept_len": (lambda a: a.update(out=(torch.empty(3, dtype=I64), torch.empty(3, 4, dtype=I32),
                                               torch.empty(3, dtype=I32), None)), "out.accept_len"),
    "out_tokens_shape": (lambda a: a.update(out=(torch.empty(3, dtype=I32), torch.empty(3, 5, dtype=I32),
                                                 torch.empty(3, dtype=I32), None)), "out.out_tokens"),
    "out_new_seq_lens": (lambda a: a.update(seq_lens=torch.zeros(3, dtype=I32),
                                            out=(torch.empty(3, dtype=I32), torch.empty(3, 4, dtype=I32),
                                                 torch.empty(3, dtype=I32), None)), "out.new_seq_lens"),
    "out_bonus_is_accept_len": (lambda a: a.update(out=_aliased_verify_out()), "out.accept_len, out.bonus"),
    "out_aliases_block_tokens": (lambda a: a.update(out=(torch.empty(3, dtype=I32), a["block_tokens"],
                                                         torch.empty(3, dtype=I32), None)),
                                 "block_tokens"),
}


def _aliased_verify_out():
    x = torch.empty(3, dtype=I32)
    return (x, torch.empty(3, 4, dtype=I32), x, None)


@pytest.mark.parametrize("case", sorted(VERIFY_CASES))
def test_verify_chain_rejects(case):
    args = verify_args()
    breaker, needle = VERIFY_CASES[case]
    breaker(args)
    with pytest.raises(ValueError, match=needle):
        dk.verify_chain(**args, backend="reference")


@pytest.mark.parametrize("op, make, empty", [
    (dk.verify_chain, lambda: dict(logits=torch.randn(0, 4, 50),
                                   block_tokens=torch.zeros(0, 4, dtype=I64)), "B = 0"),
    (dk.fuse_target_features, lambda: dict(features=torch.randn(3, 0, dtype=F16),
                                           fc_weight=torch.randn(0, 0, dtype=F16),
                                           norm_weight=torch.randn(0, dtype=F16)), "H = 0"),
    (dk.inject_kv, lambda: dict(inject_args(), hidden=torch.randn(0, 32, dtype=F16),
                                positions=torch.zeros(0, dtype=I64),
                                slot_mapping=torch.zeros(0, dtype=I64)), "N = 0"),
    (dk.write_kv, lambda: dict(write_args(), k=torch.randn(0, 2, 2, 64, dtype=F16),
                               v=torch.randn(0, 2, 2, 64, dtype=F16),
                               positions=torch.zeros(0, dtype=I64),
                               slot_mapping=torch.zeros(0, dtype=I64)), "N = 0"),
    (dk.block_attention, lambda: dict(attention_args(), q=torch.randn(0, 4, 4, 64, dtype=F16),
                                      block_table=torch.zeros(0, 3, dtype=I32),
                                      context_lens=torch.zeros(0, dtype=I32),
                                      k_block=torch.randn(0, 4, 2, 64, dtype=F16),
                                      v_block=torch.randn(0, 4, 2, 64, dtype=F16)), "B = 0"),
])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_shapes_are_valid(op, make, empty, backend):
    """Valid edge shapes launch nothing and return empty (or untouched) outputs."""
    args = make()
    caches = [args[k].clone() for k in ("k_cache", "v_cache") if k in args]
    result = op(**args, backend=backend)
    if op is dk.verify_chain:
        assert result.accept_len.shape == (0,) and result.out_tokens.shape == (0, 4)
    elif op is dk.fuse_target_features:
        assert result.shape == (3, 0)
    elif op is dk.block_attention:
        assert result.shape == (0, 4, 4, 64)
    for before, k in zip(caches, ("k_cache", "v_cache")):
        assert torch.equal(before, args[k]), empty


def test_huge_window_means_no_window():
    """A window wider than any query-key distance is no window, however large the int."""
    args = attention_args()
    plain = dk.block_attention(**args, backend="reference")
    for w in (10 ** 6, 2 ** 63, 2 ** 100):
        assert torch.equal(dk.block_attention(**args, window=w, backend="reference"), plain)


def test_device_mismatch_is_named():
    """A tensor on another device than the first one is named (meta stands in for a GPU)."""
    args = verify_args()
    args["logits"] = args["logits"].to("meta")
    with pytest.raises(ValueError, match="logits: expected a tensor on cpu"):
        dk.verify_chain(**args, backend="reference")


# ------------------------------------------------- the valid baselines run
@pytest.mark.parametrize("op, make", [
    (dk.block_attention, attention_args),
    (dk.fuse_target_features, fuse_args),
    (dk.inject_kv, inject_args),
    (dk.write_kv, write_args),
    (dk.verify_chain, verify_args),
])
def test_valid_baseline_is_accepted(op, make):
    op(**make(), backend="reference")


def test_validation_reads_no_device_value(monkeypatch):
    """Validation must not synchronise: no .item()/.tolist() on any input."""
    def forbidden(*_a, **_k):
        raise AssertionError("validation read a tensor value")

    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    monkeypatch.setattr(torch.Tensor, "__bool__", forbidden)
    for breaker, needle in ATTENTION_CASES.values():
        if needle is None:
            continue
        args = attention_args()
        breaker(args)
        with pytest.raises(ValueError):
            dk.block_attention(**args, backend="reference")


def test_backends_receive_dense_small_inputs(monkeypatch):
    """Per-request / per-token vectors given as strided or expanded views (a
    column of an engine's state tensor, a scalar expanded over the batch) reach
    the backend dense, since the kernels index them densely."""
    from dflash_kernels import _registry

    seen = {}

    def spy(op):
        def impl(*args):
            seen[op] = [a for a in args if isinstance(a, torch.Tensor) and a.dim() <= 2]
        return impl

    monkeypatch.setattr(_registry, "get", lambda op, backend: spy(op))
    B, S, V = 4, 3, 30
    state = torch.zeros(B, 3, dtype=I32)
    col = state[:, 1]
    wide = torch.arange(B * 2, dtype=I64)[::2]
    dk.verify_chain(torch.randn(B, S, V), torch.zeros(S, B, dtype=I32).t(), num_drafts=col,
                    temperature=torch.full((1,), 0.7).expand(B), seeds=wide, positions=wide,
                    seq_lens=col, backend="reference")
    a = attention_args()
    a["block_table"] = torch.arange(12, dtype=I32).view(3, 2 * 2).t()[:2]
    a["context_lens"] = torch.tensor([5, 0, 7, 0], dtype=I32)[::2]
    dk.block_attention(**a, backend="reference")
    w = write_args()
    N = w["positions"].shape[0]
    w["positions"] = torch.arange(2 * N, dtype=I64)[::2]
    w["slot_mapping"] = torch.arange(2 * N, dtype=I64)[::2]
    dk.write_kv(**w, backend="reference")
    i = inject_args()
    i["positions"], i["slot_mapping"] = w["positions"], w["slot_mapping"]
    dk.inject_kv(**i, backend="reference")
    assert set(seen) == {"verify_chain", "block_attention", "write_kv", "inject_kv"}
    for op, tensors in seen.items():
        for t in tensors:
            assert t.is_contiguous(), (op, t.shape, t.stride())


def test_default_num_drafts_is_shared_and_never_written():
    """The default num_drafts is one cached read-only tensor per (B, S, device)."""
    from dflash_kernels import ops

    a = ops._all_drafts(3, 5, torch.device("cpu"))
    assert a is ops._all_drafts(3, 5, torch.device("cpu"))
    assert a.tolist() == [4, 4, 4]
    dk.verify_chain(torch.randn(3, 5, 20), torch.zeros(3, 5, dtype=I64), backend="reference")
    assert a.tolist() == [4, 4, 4]
