"""The fuse_target_features reference against float64 math, one output element at a time."""

import math

import pytest
import torch

import dflash_kernels


def fuse_model(parts, fc_weight, norm_weight, eps):
    """float64, one output element at a time."""
    N, H = parts[0].shape[0], fc_weight.shape[0]
    x = torch.cat([p.double().cpu() for p in parts], 1)
    w = fc_weight.double().cpu()
    out = torch.empty(N, H, dtype=torch.float64)
    for n in range(N):
        y = torch.tensor([float(torch.dot(x[n], w[j])) for j in range(H)], dtype=torch.float64)
        r = 1.0 / math.sqrt(float((y * y).sum()) / H + eps)
        out[n] = y * r * norm_weight.double().cpu()
    return out


@pytest.mark.parametrize("widths, concatenated", [((16, 16, 16), True), ((16, 24, 8), False),
                                                  ((40,), False)])
def test_fuse_target_features_reference(device, widths, concatenated):
    N, H = 5, 16
    parts = [torch.randn(N, w, device=device).half() for w in widths]
    fc_weight = (torch.randn(H, sum(widths), device=device) / 4).half()
    norm_weight = 1 + 0.3 * torch.randn(H, device=device)
    out = torch.full((N, H), float("nan"), dtype=torch.float16, device=device)
    feats = torch.cat(parts, 1) if concatenated else parts
    got = dflash_kernels.fuse_target_features(feats, fc_weight, norm_weight, eps=1e-5, out=out,
                                              backend="reference")
    assert got is out
    torch.testing.assert_close(out.double().cpu(), fuse_model(parts, fc_weight, norm_weight, 1e-5),
                               rtol=2e-3, atol=2e-3)
