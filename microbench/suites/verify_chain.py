"""Suite ``verify_chain``: the op over the target's logits of a drafted block.

The logits are unit-scale noise with one planted winner per row (logit 16,
far above the noise, so that greedy ties cannot happen); request b's drafts
copy the planted winners of its first ``a_b`` rows (``a_b`` drawn once per
case in 0..S-1) and then differ, so the acceptance lengths look like a real
step's.

Modes (one row each, ``verify_chain[mode]``):

- ``greedy``: compared with the PyTorch composition (softmax, argmax, compare,
  cumprod, bonus).
- ``sampled``: temperature 1, keyed Gumbel noise, point-mass drafts.
- ``top_k``, ``top_p``, ``top_k+top_p`` (sequential: top-p over the top-k set
  renormalised, vLLM's order), ``top_k+top_p_joint`` (``filter_order="joint"``,
  SGLang's DFlash order): ``sampled`` plus the filters, ``top_k = 20``,
  ``top_p = 0.95`` for every request (Qwen3's recommended sampling settings;
  the temperature stays 1 so that the rows differ from ``sampled`` only by the
  filters).
- ``draft_probs``: ``sampled`` with draft distributions (the rejection rule):
  row j of ``draft_probs`` is unit noise with draft j+1 planted at 16, softmaxed
  (a confident drafter), in the logits' dtype.

At these logits the planted winner holds ~97% of a row's mass at T = 1
(151,936 unit-normal logits: ``e^16 / (e^16 + V e^0.5)``), so top-p 0.95 keeps
only the winner and top-k 20 keeps 20 tokens with ~all the mass on it: peaked
rows, not flat ones. Our search runs the same bounded number of passes
whatever the distribution; FlashInfer's rejection loop ends early on a peaked
row. Neither is measured here for flat rows.

Baselines: ``torch`` for ``greedy``; ``flashinfer`` for every sampled mode
when ``flashinfer.sampling`` imports and the device is CUDA, a SKIP row with
the reason otherwise. Its calls (``baselines.flashinfer_verify_chain``):

- ``sampled``: ``sampling_from_logits(logits / T)``, then the chain walk in
  PyTorch (``baselines.chain_accept``: compare with the drafts, cumprod, bonus).
- ``top_k`` / ``top_p`` / ``top_k+top_p`` / ``top_k+top_p_joint``:
  ``softmax(logits, temperature=T)``, then ``top_k_sampling_from_probs`` /
  ``top_p_sampling_from_probs`` / ``top_k_top_p_sampling_from_probs(...,
  filter_apply_order="top_k_first" | "joint")`` over the ``B*S`` rows, then
  the same chain walk.
- ``draft_probs``: ``softmax(logits, temperature=T)`` as ``target_probs`` and
  ``chain_speculative_sampling(draft_probs, drafts, target_probs)``.

What the FlashInfer rows do not do that ours do: keyed noise (ours: Philox of
(seed, position, vocab id), the same tokens whatever the batch or the
backend; FlashInfer's draws come from (seed, offset, the row's index in the
launch), so a request's tokens change with its place in the batch); the
per-request ``num_drafts`` (``chain_speculative_sampling`` verifies every
draft); ``seq_lens -> new_seq_lens`` and the bonus are PyTorch ops here; the
point-mass rows need the PyTorch chain walk after the sampler (2-3 more
launches); the probability rows materialise fp32 probabilities (``B*S*V*4``
bytes written and read again). Their tokens come from another random stream,
so they cannot equal ours: their check is the output's form (shapes, ids in
range, the bonus at ``accept_len``, -1 after it, the same accepted drafts as
ours where both accepted, ``new_seq_lens - accept_len`` as ours), and
``max_abs_err`` holds the fraction of requests whose ``out_tokens`` differ
from ours (a sample statistic, not an error).
"""

from __future__ import annotations

import torch

from .. import baselines, roofline
from ..case import LOGITS_DTYPES, Case, Impl, as_tuple, equal
from ..presets import Shape
from . import our_backends, pick_oracle

OPS = ("verify_chain",)
MODES = ("greedy", "sampled", "top_k", "top_p", "top_k+top_p", "top_k+top_p_joint", "draft_probs")
SWEEPS_CTX = False    # the context length only sets seq_lens and positions
TOP_K = 20            # Qwen3's recommended top_k (its model card / generation_config.json)
TOP_P = 0.95          # and top_p
PLANTED = 16.0        # the winner's (and the draft's) logit over unit-normal noise


def sampler_args(mode):
    """The optional arguments of ``dflash_kernels.verify_chain`` a mode passes."""
    if mode == "greedy":
        return ()
    flags = baselines.VERIFY_SAMPLERS[mode]
    names = ["temperature", "seeds", "positions"]
    names += [k for k in ("top_k", "top_p", "draft_probs") if flags.get(k)]
    if flags.get("joint"):
        names.append("filter_order")
    return tuple(names)


def make_inputs(mode, shape: Shape, batch: int, ctx: int, device, seed: int = 0):
    S, V = shape.s, shape.v
    ldt = LOGITS_DTYPES[shape.logits]
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    logits = torch.randn((batch, S, V), generator=gen, device=device, dtype=ldt)
    winners = torch.randint(0, V, (batch, S), generator=cpu_gen)
    logits.scatter_(2, winners.to(device)[:, :, None], PLANTED)
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
    if mode != "greedy":
        flags = baselines.VERIFY_SAMPLERS[mode]
        inp["temperature"] = torch.ones(batch, dtype=torch.float32, device=device)
        inp["seeds"] = torch.randint(0, 2**62, (batch,), generator=cpu_gen).to(device)
        inp["positions"] = torch.full((batch,), ctx - 1, dtype=torch.int64, device=device)
        if flags.get("top_k"):
            inp["top_k"] = torch.full((batch,), TOP_K, **i32)
        if flags.get("top_p"):
            inp["top_p"] = torch.full((batch,), TOP_P, dtype=torch.float32, device=device)
        if flags.get("draft_probs"):
            q = torch.randn((batch, S - 1, V), generator=gen, device=device, dtype=torch.float32)
            q.scatter_(2, drafts.to(device)[:, :, None], PLANTED)
            q = torch.softmax(q, dim=-1)
            inp["draft_probs"] = q.to(ldt)
            # FlashInfer's samplers take fp32 probabilities (the same tensor for fp32 logits).
            inp["draft_probs_f32"] = inp["draft_probs"].float()
    return inp


def _ours(mode, backend):
    import dflash_kernels

    args = sampler_args(mode)

    def run(inp):
        kw = {k: inp[k] for k in args if k != "filter_order"}
        if "filter_order" in args:
            kw["filter_order"] = "joint"
        return tuple(dflash_kernels.verify_chain(
            inp["logits"], inp["block_tokens"], num_drafts=inp["num_drafts"],
            seq_lens=inp["seq_lens"], backend=backend,
            out=(inp["accept_len"], inp["out_tokens"], inp["bonus"], inp["new_seq_lens"]), **kw))

    return run


def _torch(inp):
    accept, out, bonus = baselines.torch_verify_greedy(inp)
    return accept, out, bonus, inp["seq_lens"] + accept + 1


def _refused(backend, mode):
    """Why ``backend`` cannot run ``mode`` ('' when it can)."""
    from dflash_kernels._registry import unsupported_args

    try:
        bad = sorted(set(sampler_args(mode)) & set(unsupported_args("verify_chain", backend)))
    except Exception:      # not loadable: our_backends already left it out
        return ""
    return f"takes no {', '.join(bad)}" if bad else ""


def _flashinfer(mode, device):
    """The FlashInfer row of a sampled mode: runnable, or SKIP with the reason."""
    sampling = baselines.optional_module("flashinfer.sampling")
    if sampling is None:
        return Impl("flashinfer", "baseline", lambda inp: None,
                    skip="flashinfer not importable (flashinfer.sampling)")
    skip = "" if device.type == "cuda" else "FlashInfer's samplers need a CUDA device"
    return Impl("flashinfer", "baseline", baselines.flashinfer_verify_chain(sampling, mode),
                graph_ok=baselines.flashinfer_takes_seed(sampling, mode), skip=skip)


def compare(v):
    """Ours: every output exactly equal. A baseline that returns a fifth tensor (its own
    sampled tokens, another random stream): the output's form only, see the module
    docstring; the error is the fraction of requests whose ``out_tokens`` differ."""

    def check(got, want):
        got, want = as_tuple(got), as_tuple(want)
        if len(got) == len(want):
            return equal(got, want)
        accept, out, bonus, new = (t.to(torch.int64) for t in got[:4])
        w_accept, w_out, _, w_new = (t.to(torch.int64) for t in want[:4])
        for g, w in zip(got[:4], want[:4]):
            if g.shape != w.shape:
                return False, None, f"shape {list(g.shape)} != {list(w.shape)}"
        B, S = out.shape
        if bool(((accept < 0) | (accept > S - 1)).any()):
            return False, None, "accept_len outside 0..S-1"
        if bool(((bonus < 0) | (bonus >= v)).any()):
            return False, None, "bonus outside [0, V)"
        pos = torch.arange(S, device=out.device)[None, :]
        a = accept[:, None]
        if not torch.equal(out.gather(1, a).squeeze(1), bonus):
            return False, None, "out_tokens[accept_len] is not the bonus"
        if bool((out[pos > a] != -1).any()):
            return False, None, "out_tokens after the bonus are not -1"
        both = pos < torch.minimum(a, w_accept[:, None])
        if bool((out[both] != w_out[both]).any()):
            return False, None, "accepted drafts differ from the reference's"
        if not torch.equal(new - accept, w_new - w_accept):
            return False, None, "new_seq_lens - accept_len differs from the reference's"
        differ = (out != w_out).any(dim=1).double().mean()
        return True, float(differ), ""

    return check


def build_case(op, shape, batch, ctx, dtype, device, *, mode="greedy", interpret=False, seed=0):
    impls = [Impl(b, "ours", _ours(mode, b), skip=_refused(b, mode))
             for b in our_backends(OPS, device, interpret)]
    if mode == "greedy":
        impls.append(Impl("torch", "baseline", _torch))
    else:
        impls.append(_flashinfer(mode, device))
    flags = baselines.VERIFY_SAMPLERS.get(mode, {})
    ldt = LOGITS_DTYPES[shape.logits]
    nbytes = roofline.verify_bytes(batch=batch, s=shape.s, v=shape.v, logits_elt=ldt.itemsize,
                                   token_elt=4, sampled=mode != "greedy", seq_lens=True)
    nbytes += 4 * batch * (bool(flags.get("top_k")) + bool(flags.get("top_p")))
    if flags.get("draft_probs"):
        # q(x) of every draft, and one q row per request (the residual at its first rejection).
        nbytes += batch * (shape.s - 1 + shape.v) * ldt.itemsize
    oracle = pick_oracle(impls)
    if mode != "greedy" and (oracle is None or oracle.name != "reference"):
        oracle = None     # nothing trustworthy to compare with
    return Case(
        suite="verify_chain", op=op, mode=mode, shape=shape, dtype=dtype, batch=batch, ctx=ctx,
        make_inputs=lambda: make_inputs(mode, shape, batch, ctx, device, seed),
        impls=impls, oracle=oracle, compare=compare(shape.v), nbytes=nbytes,
        outputs=("accept_len", "out_tokens", "bonus", "new_seq_lens"), extra=_extra(flags))


def _extra(flags):
    """The filter settings of a mode, for the JSON rows."""
    extra = {}
    if flags.get("top_k"):
        extra["top_k"] = TOP_K
    if flags.get("top_p"):
        extra["top_p"] = TOP_P
    if flags.get("top_k") and flags.get("top_p"):
        extra["filter_order"] = "joint" if flags.get("joint") else "sequential"
    return extra
