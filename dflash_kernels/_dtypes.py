"""Dtype sets and fp8 limits shared by the public layer and every backend."""

from __future__ import annotations

import torch

ACT_DTYPES = (torch.float16, torch.bfloat16)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Largest finite value of each fp8 format (448 for e4m3fn, 57344 for e5m2):
# quantized values saturate there, never to NaN or inf.
FP8_MAX = {d: float(torch.finfo(d).max) for d in FP8_DTYPES}
