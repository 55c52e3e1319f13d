"""Suite ``verify_tree``: the op over the target's logits of a drafted tree.

Random bushy trees (``_tree.random_parents``, fixed seed) of N = 16, 32, 64, 128
nodes; unit-normal logits with one planted winner per node row (logit 16: no
greedy ties); each node's token copies its parent's winner with probability
1/2 (else a random id), so the walk accepts a few levels as in a real step.
Modes ``greedy-nN`` (compared with the PyTorch composition: argmax, match with
the parent's target, lowest matching sibling, pointer-doubling ancestor AND)
and ``sampled-nN`` (temperature 1, keyed noise; checked against the reference
only, no PyTorch baseline).
"""

from __future__ import annotations

import torch

from .. import baselines, roofline
from ..case import LOGITS_DTYPES, Case, Impl, equal
from ..presets import Shape
from . import _tree, our_backends, pick_oracle

OPS = ("verify_tree",)
MODES = _tree.node_modes("greedy") + _tree.node_modes("sampled")
SWEEPS_CTX = False    # the context length only sets seq_lens and positions
LAUNCHES = {"triton": 2}      # counted from the code: verify_chain's row pass + the walk


def make_inputs(sampled: bool, shape: Shape, batch: int, n: int, ctx: int, device, seed: int = 0,
                v: int = None):
    V = v or shape.v
    ldt = LOGITS_DTYPES[shape.logits]
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    parents = _tree.random_parents(batch, n, seed)
    logits = torch.randn((batch, n, V), generator=gen, device=device, dtype=ldt)
    winners = torch.randint(0, V, (batch, n), generator=cpu_gen)
    logits.scatter_(2, winners.to(device)[:, :, None], 16.0)
    copy = torch.rand((batch, n), generator=cpu_gen) < 0.5
    parent_win = winners.gather(1, parents.clamp(min=0).long())
    tokens = torch.where(copy, parent_win, torch.randint(0, V, (batch, n), generator=cpu_gen))
    i32 = dict(dtype=torch.int32, device=device)
    inp = {
        "logits": logits, "tree_tokens": tokens.to(**i32), "parents": parents.to(device),
        "seq_lens": torch.full((batch,), ctx, **i32),
        "accept_len": torch.empty(batch, **i32), "accepted_nodes": torch.empty(batch, n, **i32),
        "out_tokens": torch.empty(batch, n, **i32), "bonus": torch.empty(batch, **i32),
        "new_seq_lens": torch.empty(batch, **i32),
    }
    if sampled:
        inp["temperature"] = torch.ones(batch, dtype=torch.float32, device=device)
        inp["seeds"] = torch.randint(0, 2**62, (batch,), generator=cpu_gen).to(device)
        inp["positions"] = torch.full((batch,), ctx, dtype=torch.int64, device=device)
    return inp


OUTPUTS = ("accept_len", "accepted_nodes", "out_tokens", "bonus", "new_seq_lens")


def _ours(sampled, backend):
    import dflash_kernels

    def run(inp):
        kw = {}
        if sampled:
            kw = dict(temperature=inp["temperature"], seeds=inp["seeds"], positions=inp["positions"])
        return tuple(dflash_kernels.verify_tree(
            inp["logits"], inp["tree_tokens"], inp["parents"], seq_lens=inp["seq_lens"],
            out=tuple(inp[k] for k in OUTPUTS), backend=backend, **kw))

    return run


def build_case(op, shape, batch, ctx, dtype, device, *, mode="greedy-n16", interpret=False, seed=0):
    sampled = mode.startswith("sampled")
    n = _tree.nodes_of(mode)
    impls = [Impl(b, "ours", _ours(sampled, b)) for b in our_backends(OPS, device, interpret)]
    extra = {"n_nodes": n, "launches": dict(LAUNCHES)}
    if not sampled:
        impls.append(Impl("torch", "baseline", baselines.torch_verify_tree_greedy))
        # The op count does not depend on V or B: counted on a small CPU copy of the case.
        c = _tree.count_device_ops(baselines.torch_verify_tree_greedy, make_inputs(
            False, shape, 1, n, ctx, torch.device("cpu"), seed, v=64))
        extra.update(torch_ops=c["ops"], torch_host_syncs=c["host_syncs"])
    nbytes = roofline.verify_tree_bytes(batch=batch, n=n, v=shape.v,
                                        logits_elt=LOGITS_DTYPES[shape.logits].itemsize,
                                        token_elt=4, sampled=sampled, seq_lens=True)
    oracle = pick_oracle(impls)
    if sampled and (oracle is None or oracle.name != "reference"):
        oracle = None     # nothing trustworthy to compare with
    return Case(
        suite="verify_tree", op=op, mode=mode, shape=shape, dtype=dtype, batch=batch, ctx=ctx,
        make_inputs=lambda: make_inputs(sampled, shape, batch, n, ctx, device, seed),
        impls=impls, oracle=oracle, compare=equal, nbytes=nbytes, outputs=OUTPUTS, extra=extra)
