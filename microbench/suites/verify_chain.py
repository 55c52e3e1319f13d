"""Suite ``verify_chain``: the op over the target's logits of a drafted block.

The logits are unit-scale noise with one planted winner per row (logit 16,
far above the noise, so that greedy ties cannot happen); request b's drafts
copy the planted winners of its first ``a_b`` rows (``a_b`` drawn once per
case in 0..S-1) and then differ, so the acceptance lengths look like a real
step's. Two modes: ``greedy`` is compared with the PyTorch composition;
``sampled`` (temperature 1, keyed Gumbel noise) has no PyTorch baseline here
and is checked against the reference only.
"""

from __future__ import annotations

import torch

from .. import baselines, roofline
from ..case import LOGITS_DTYPES, Case, Impl, equal
from ..presets import Shape
from . import our_backends, pick_oracle

OPS = ("verify_chain",)
MODES = ("greedy", "sampled")
SWEEPS_CTX = False    # the context length only sets seq_lens and positions


def make_inputs(mode, shape: Shape, batch: int, ctx: int, device, seed: int = 0):
    S, V = shape.s, shape.v
    ldt = LOGITS_DTYPES[shape.logits]
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    logits = torch.randn((batch, S, V), generator=gen, device=device, dtype=ldt)
    winners = torch.randint(0, V, (batch, S), generator=cpu_gen)
    logits.scatter_(2, winners.to(device)[:, :, None], 16.0)
    accept = torch.randint(0, S, (batch,), generator=cpu_gen)
    tokens = torch.randint(0, V, (batch, S), generator=cpu_gen)
    j = torch.arange(1, S)[None, :]
    prev = winners[:, :-1]
    drafts = torch.where(j <= accept[:, None], prev, tokens[:, 1:])
    # The first draft after the accepted ones must miss.
    drafts = torch.where((j == accept[:, None] + 1) & (drafts == prev), (prev + 1) % V, drafts)
    block_tokens = torch.cat([tokens[:, :1], drafts], dim=1).to(device=device, dtype=torch.int32)
    i32 = dict(dtype=torch.int32, device=device)
    inp = {
        "logits": logits, "block_tokens": block_tokens,
        "num_drafts": torch.full((batch,), S - 1, **i32),
        "seq_lens": torch.full((batch,), ctx, **i32),
        "accept_len": torch.empty(batch, **i32), "out_tokens": torch.empty(batch, S, **i32),
        "bonus": torch.empty(batch, **i32), "new_seq_lens": torch.empty(batch, **i32),
    }
    if mode == "sampled":
        inp["temperature"] = torch.ones(batch, dtype=torch.float32, device=device)
        inp["seeds"] = torch.randint(0, 2**62, (batch,), generator=cpu_gen).to(device)
        inp["positions"] = torch.full((batch,), ctx - 1, dtype=torch.int64, device=device)
    return inp


def _ours(mode, backend):
    import dflash_kernels

    def run(inp):
        kw = {}
        if mode == "sampled":
            kw = dict(temperature=inp["temperature"], seeds=inp["seeds"], positions=inp["positions"])
        return tuple(dflash_kernels.verify_chain(
            inp["logits"], inp["block_tokens"], num_drafts=inp["num_drafts"],
            seq_lens=inp["seq_lens"], backend=backend,
            out=(inp["accept_len"], inp["out_tokens"], inp["bonus"], inp["new_seq_lens"]), **kw))

    return run


def _torch(inp):
    accept, out, bonus = baselines.torch_verify_greedy(inp)
    return accept, out, bonus, inp["seq_lens"] + accept + 1


def build_case(op, shape, batch, ctx, dtype, device, *, mode="greedy", interpret=False, seed=0):
    impls = [Impl(b, "ours", _ours(mode, b)) for b in our_backends(OPS, device, interpret)]
    if mode == "greedy":
        impls.append(Impl("torch", "baseline", _torch))
    nbytes = roofline.verify_bytes(batch=batch, s=shape.s, v=shape.v,
                                   logits_elt=LOGITS_DTYPES[shape.logits].itemsize, token_elt=4,
                                   sampled=mode == "sampled", seq_lens=True)
    oracle = pick_oracle(impls)
    if mode == "sampled" and (oracle is None or oracle.name != "reference"):
        oracle = None     # nothing trustworthy to compare with
    return Case(
        suite="verify_chain", op=op, mode=mode, shape=shape, dtype=dtype, batch=batch, ctx=ctx,
        make_inputs=lambda: make_inputs(mode, shape, batch, ctx, device, seed),
        impls=impls, oracle=oracle, compare=equal, nbytes=nbytes,
        outputs=("accept_len", "out_tokens", "bonus", "new_seq_lens"))
