"""Suite ``build_tree``: the draft tree of one block's draft logits, on the device.

Draft logits ``[B, S-1, V]`` (the preset's S and V, its logits dtype), standard
normal with no planted structure: a flat row is the hard case for the top-k pass
(its candidate list keeps changing in the first tiles) and gives bushy trees.
top_k 8 (at most V), one mode per budget N = 16, 32, 64, 128 (``n16`` ...). The
PyTorch baseline is the engines' way (``baselines.torch_build_tree``: top-k,
per-depth beams, one sort); the reference backend is the oracle.
"""

from __future__ import annotations

import torch

from .. import baselines, roofline
from ..case import LOGITS_DTYPES
from . import _tree

OPS = ("build_tree",)
MODES = _tree.node_modes()
SWEEPS_CTX = False    # no context
LAUNCHES = {"triton": 2}      # counted from the code: the split top-k pass + the selection
TOP_K = 8


def make_inputs(shape, batch: int, n: int, device, seed: int = 0, v: int = None):
    V = v or shape.v
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((batch, shape.s - 1, V), generator=gen, device=device,
                    dtype=LOGITS_DTYPES[shape.logits])
    i32 = dict(dtype=torch.int32, device=device)
    return {"draft_logits": x, "num_nodes_budget": n, "top_k": min(TOP_K, V),
            "tree_tokens": torch.empty(batch, n, dtype=torch.int64, device=device),
            "parents": torch.empty(batch, n, **i32), "num_nodes": torch.empty(batch, **i32),
            "depth": torch.empty(batch, n, **i32)}


OUTPUTS = ("tree_tokens", "parents", "num_nodes", "depth")


def _ours(backend):
    import dflash_kernels

    def run(inp):
        return tuple(dflash_kernels.build_tree(
            inp["draft_logits"], inp["num_nodes_budget"], top_k=inp["top_k"],
            out=tuple(inp[k] for k in OUTPUTS), backend=backend))

    return run


def build_case(op, shape, batch, ctx, dtype, device, *, mode="n16", interpret=False, seed=0):
    n = _tree.nodes_of(mode)
    return _tree.node_case(
        "build_tree", OPS, _ours, baselines.torch_build_tree,
        make_inputs(shape, 1, n, torch.device("cpu"), seed, v=64), op=op, mode=mode, shape=shape,
        batch=batch, ctx=ctx, dtype=dtype, device=device, interpret=interpret,
        make_inputs=lambda: make_inputs(shape, batch, n, device, seed),
        nbytes=roofline.build_tree_bytes(batch=batch, d=shape.s - 1, v=shape.v, n=n,
                                         logits_elt=LOGITS_DTYPES[shape.logits].itemsize),
        outputs=OUTPUTS, launches=LAUNCHES, top_k=min(TOP_K, shape.v))
