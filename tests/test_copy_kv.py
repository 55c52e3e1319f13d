"""copy_kv (reference and Triton) against a snapshot-then-assign loop: cycles
(a source that is another pair's destination), skipped pairs, every layer of a
stacked or listed cache, NHD / HND / combined layouts, fp8 and NaN payloads
copied bit for bit, sentinel-filled caches (everything else unchanged)."""

import pytest
import torch

import dflash_kernels as dk

BACKENDS = ["reference", "triton"]
INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def bits(t):
    return t.view(INT[t.element_size()])


def make_caches(L, P, page, Hkv, D, dtype, layout, gen):
    """Two caches (K, V) filled with random bit patterns (NaN and inf included for floats)."""
    def one():
        shape = {"nhd": (L, P, page, Hkv, D), "hnd": (L, P, Hkv, page, D),
                 "combined": (L, 2, P, page, Hkv, D)}[layout]
        esz = torch.empty((), dtype=dtype).element_size()
        raw = torch.randint(-2 ** (8 * esz - 1), 2 ** (8 * esz - 1), shape, generator=gen,
                            dtype=torch.int64).to(INT[esz] if esz > 1 else torch.int8)
        t = raw.view(dtype)
        if layout == "hnd":
            t = t.permute(0, 1, 3, 2, 4)
        elif layout == "combined":
            t = t[:, 1]
        return t
    return one(), one()


def expected(src, dst, cache):
    """Snapshot, then assign every kept pair: all reads before any write."""
    want = bits(cache).clone()
    snap = bits(cache).clone()
    page = cache.shape[2]
    for s, d in zip(src.tolist(), dst.tolist()):
        if d >= 0:
            want[:, d // page, d % page] = snap[:, s // page, s % page]
    return want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, layout, as_list, page, M", [
    (torch.float16, "nhd", False, 16, 7),
    (torch.bfloat16, "hnd", True, 4, 13),
    (torch.float8_e4m3fn, "combined", False, 2, 9),
    (torch.float8_e5m2, "nhd", True, 3, 5),
    (torch.float32, "hnd", False, 8, 1),
    (torch.float16, "nhd", True, 8, 45),           # more pairs than one tile: staged
])
def test_against_loops(backend, dtype, layout, as_list, page, M):
    gen = torch.Generator().manual_seed(M)
    L, P, Hkv, D = 3, 7, 2, 64
    kc, vc = make_caches(L, P, page, Hkv, D, dtype, layout, gen)
    n = P * page
    perm = torch.randperm(n, generator=gen)
    src = perm[:M].clone()
    dst = torch.roll(perm, -max(1, M // 2))[:M].clone()    # distinct, overlapping the sources
    if M >= 5:
        src[0], src[1] = dst[1].item(), dst[0].item()      # a swap of two slots
        dst[2] = -1                                        # skipped
        dst[3] = -7
    want_k, want_v = expected(src, dst, kc), expected(src, dst, vc)
    assert not torch.equal(want_k, bits(kc))               # the case moves something
    if as_list:
        # Separate allocations per layer (not one stride apart): the kernel's pointer table.
        kc_l = [x.clone() if layout != "hnd" else x.permute(0, 2, 1, 3).clone().permute(0, 2, 1, 3)
                for x in kc.unbind(0)]
        vc_l = [x.clone() if layout != "hnd" else x.permute(0, 2, 1, 3).clone().permute(0, 2, 1, 3)
                for x in vc.unbind(0)]
        dk.copy_kv(src, dst, kc_l, vc_l, backend=backend)
        got_k, got_v = torch.stack([bits(x) for x in kc_l]), torch.stack([bits(x) for x in vc_l])
    else:
        dk.copy_kv(src, dst, kc, vc, backend=backend)
        got_k, got_v = bits(kc), bits(vc)
    assert torch.equal(got_k, want_k)
    assert torch.equal(got_v, want_v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cycle_and_all_skipped(backend):
    gen = torch.Generator().manual_seed(1)
    kc, vc = make_caches(2, 4, 4, 1, 64, torch.float16, "nhd", gen)
    # A 3-cycle 3 -> 7 -> 12 -> 3 and a pair whose source is a skipped destination.
    src = torch.tensor([3, 7, 12, 5])
    dst = torch.tensor([7, 12, 3, 9])
    want_k, want_v = expected(src, dst, kc), expected(src, dst, vc)
    dk.copy_kv(src, dst, kc, vc, backend=backend)
    assert torch.equal(bits(kc), want_k) and torch.equal(bits(vc), want_v)
    before_k, before_v = bits(kc).clone(), bits(vc).clone()
    dk.copy_kv(src, torch.full((4,), -1), kc, vc, backend=backend)
    dk.copy_kv(src[:0], src[:0], kc, vc, backend=backend)
    assert torch.equal(bits(kc), before_k) and torch.equal(bits(vc), before_v)


def test_validation_errors():
    kc = torch.zeros(2, 3, 4, 1, 64, dtype=torch.float16)
    s = torch.tensor([0, 1])
    for args, name in [((s.int(), s, kc, kc), "src_slots"),
                       ((s, s[:1], kc, kc), "dst_slots"),
                       ((s, s, kc[0], kc), "k_cache"),
                       ((s, s, kc, kc[:1]), "v_cache"),
                       ((s, s, kc, kc.float()), "v_cache"),
                       ((s, s, list(kc), list(kc[:1])), "v_cache"),
                       ((s, s, [], []), "k_cache")]:
        with pytest.raises(ValueError, match=name):
            dk.copy_kv(*args, backend="reference")


@pytest.mark.parametrize("staged, arch", [(True, 90), (False, 100)])
def test_kernel_compiles_without_spills(staged, arch):
    from dflash_kernels.triton_backend import copy_kv as tck
    from microbench.compile import compile_report

    spec = tck.compile_spec(staged)
    rep = compile_report("dflash_kernels.triton_backend.copy_kv", "_copy_kv_kernel",
                         spec["signature"], spec["constexprs"], arch, spec["num_warps"],
                         spec["num_stages"])
    assert rep["spills"] == 0 and rep["registers"] <= 128, rep
    assert "bar.sync" in rep["ptx"] or "barrier.sync" in rep["ptx"]   # reads before writes
