"""Suite ``tree_mask``: ancestor-or-self bits and depths of a batch of draft trees.

Random bushy trees (``_tree.random_parents``, fixed seed) of N = 16, 32, 64, 128
nodes, one mode per N (``n16`` ...). The PyTorch baseline builds the ancestor
sets by pointer doubling over a dense ``[B, N, N]`` bool (ceil(log2 N) rounds)
and packs them into words; the reference backend is the oracle.
"""

from __future__ import annotations

import torch

from .. import baselines, roofline
from . import _tree

OPS = ("tree_mask",)
MODES = _tree.node_modes()
SWEEPS_CTX = False    # no context
LAUNCHES = {"triton": 1}      # counted from the code (triton_backend/tree_mask.py)


def make_inputs(batch: int, n: int, device, seed: int = 0):
    W = (n + 31) // 32
    i32 = dict(dtype=torch.int32, device=device)
    return {"parents": _tree.random_parents(batch, n, seed).to(device),
            "mask": torch.empty(batch, n, W, **i32), "depth": torch.empty(batch, n, **i32)}


def _ours(backend):
    import dflash_kernels

    def run(inp):
        return tuple(dflash_kernels.tree_mask(inp["parents"], out=(inp["mask"], inp["depth"]),
                                              backend=backend))

    return run


def build_case(op, shape, batch, ctx, dtype, device, *, mode="n16", interpret=False, seed=0):
    n = _tree.nodes_of(mode)
    return _tree.node_case(
        "tree_mask", OPS, _ours, baselines.torch_tree_mask,
        make_inputs(1, n, torch.device("cpu"), seed), op=op, mode=mode, shape=shape,
        batch=batch, ctx=ctx, dtype=dtype, device=device, interpret=interpret,
        make_inputs=lambda: make_inputs(batch, n, device, seed),
        nbytes=roofline.tree_mask_bytes(batch=batch, n=n), outputs=("mask", "depth"),
        launches=LAUNCHES, words=(n + 31) // 32)
