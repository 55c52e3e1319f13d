"""Benchmark suites: one module per op, named after it, each with ``OPS`` (the op,
and for inject_kv the whole injection step), ``SWEEPS_CTX``, ``build_case``
and optionally ``MODES`` (verify_chain: greedy, sampled; the tree suites: one per node
count N = 16, 32, 64, 128, e.g. ``n64``, ``greedy-n64``)."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ..case import Impl

SUITES = ("block_attention", "fuse_target_features", "inject_kv", "write_kv", "verify_chain",
          "verify_tree", "tree_mask", "copy_kv", "build_tree")
OUR_BACKENDS = ("cuda", "triton", "reference")
BASELINES = ("torch", "flashinfer", "flash_attn")


def module(suite: str):
    import importlib

    if suite not in SUITES:
        raise KeyError(suite)
    return importlib.import_module(f"{__name__}.{suite}")


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
