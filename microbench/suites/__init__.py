"""Benchmark suites: one module per op family, each with ``OPS`` and ``build_case``."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ..case import Impl

SUITES = ("attention", "inject", "verify")
OUR_BACKENDS = ("cuda", "triton", "reference")
BASELINES = ("torch", "flashinfer", "flash_attn")


def module(suite: str):
    from . import attention, inject, verify
    return {"attention": attention, "inject": inject, "verify": verify}[suite]


def our_backends(ops: Sequence[str], device: torch.device, interpret: bool) -> List[str]:
    """Our backends that implement every op in ``ops`` on ``device``, best first.

    On the CPU the Triton backend runs only under the interpreter, which the
    bench uses only when ``--interpret`` asks for it.
    """
    import dflash_kernels

    avail: Dict[str, List[str]] = dflash_kernels.backends(device.type)
    names = [b for b in OUR_BACKENDS if all(b in avail[op] for op in ops)]
    if device.type == "cpu" and not interpret:
        names = [b for b in names if b != "triton"]
    return names


def pick_oracle(impls: List[Impl]):
    """The reference backend when it exists, else the PyTorch composition."""
    for want in ("reference", "torch"):
        for impl in impls:
            if impl.name == want and not impl.skip:
                return impl
    return None
