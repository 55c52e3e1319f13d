"""Triton fuse_target_features against the reference (interpreter on CPU, fp16;
bf16 on a GPU only), its split-K choice, and compile checks for sm_90 / sm_100.
"""

import math

import pytest
import torch

import dflash_kernels
from dflash_kernels.triton_backend import fuse_target_features as tri
from helpers import assert_compiles_to_tensor_cores, sentinel_fill


def test_fuse_split_choice():
    cpu = torch.device("cpu")
    assert tri._fuse_split(1, 2, 10, cpu) == 2     # the first fuse case below runs two splits
    assert tri._fuse_split(1, 2, 3, cpu) == 1      # too few K tiles to split
    assert tri._fuse_split(8, 64, 400, cpu) == 1   # the grid is already full


@pytest.mark.parametrize("widths, concatenated, N, H", [
    ((80, 72, 120), False, 7, 48),       # K split inside a part (interpreter: 2 splits)
    ((48, 48, 48), True, 5, 40),
    ((16,) * 9, False, 3, 32),           # more parts than one launch takes (tail joined)
])
def test_fuse_target_features_triton(device, widths, concatenated, N, H):
    act = torch.float16
    parts = [torch.randn(N, w, device=device).to(act) for w in widths]
    fc_weight = (torch.randn(H, sum(widths), device=device) / math.sqrt(sum(widths))).to(act)
    norm_weight = 1 + 0.3 * torch.randn(H, device=device)
    if not concatenated:
        # A strided view (ops.py checks only its shape): the kernel must not assume a unit stride.
        norm_weight = torch.stack([torch.full_like(norm_weight, 7.0), norm_weight], 1)[:, 1]
    feats = torch.cat(parts, 1) if concatenated else parts
    out = sentinel_fill(torch.empty(N, H, dtype=act, device=device))
    ref = torch.empty(N, H, dtype=act, device=device)
    got = dflash_kernels.fuse_target_features(feats, fc_weight, norm_weight, out=out, backend="triton")
    dflash_kernels.fuse_target_features(feats, fc_weight, norm_weight, out=ref, backend="reference")
    assert got is out
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


def test_fuse_target_features_triton_bf16(device):
    N, H, widths = 37, 1024, (1024, 1024, 1024)
    parts = [torch.randn(N, w, device=device).bfloat16() for w in widths]
    fc_weight = (torch.randn(H, sum(widths), device=device) / math.sqrt(sum(widths))).bfloat16()
    norm_weight = torch.randn(H, device=device).bfloat16()
    out = dflash_kernels.fuse_target_features(parts, fc_weight, norm_weight, backend="triton")
    ref = dflash_kernels.fuse_target_features(parts, fc_weight, norm_weight, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1.6e-2, atol=1.6e-2)


@pytest.mark.parametrize("arch", [90, 100])
def test_compiles_to_tensor_cores_without_spills(arch):
    """Default launch for H = 4096, bf16, three parts."""
    spec = tri.compile_spec(arch, torch.bfloat16)
    assert_compiles_to_tensor_cores("dflash_kernels.triton_backend.fuse_target_features", spec, arch)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fuse_on_a_non_current_gpu():
    # Triton launches on the current device; the op must launch on its tensors' one.
    dev, act, N, H = "cuda:1", torch.float16, 5, 64
    feats = torch.randn(N, 3 * H, device=dev).to(act)
    fc_weight = (torch.randn(H, 3 * H, device=dev) / 16).to(act)
    norm_weight = 1 + 0.3 * torch.randn(H, device=dev)
    with torch.cuda.device(0):
        got = dflash_kernels.fuse_target_features(feats, fc_weight, norm_weight, backend="triton")
    want = dflash_kernels.fuse_target_features(feats, fc_weight, norm_weight, backend="reference")
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_empty_shapes_direct_call():
    # H = 0 divided by zero in the split choice; zero-width features (K = 0) too.
    out = torch.empty(3, 0, dtype=torch.float16)
    tri.fuse_target_features([torch.randn(3, 8).half()], torch.randn(0, 8).half(),
                             torch.randn(0).half(), 1e-6, out)
    out = torch.full((3, 16), 7.0, dtype=torch.float16)
    tri.fuse_target_features([torch.randn(3, 0).half()], torch.randn(16, 0).half(),
                             torch.randn(16).half(), 1e-6, out)
    assert (out == 0).all()
    out = torch.empty(0, 16, dtype=torch.float16)
    tri.fuse_target_features([torch.randn(0, 8).half()], torch.randn(16, 8).half(),
                             torch.randn(16).half(), 1e-6, out)
