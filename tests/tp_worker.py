"""Rank side of tests/test_verify_chain_tp.py: kept free of pytest / scipy so that the
forkserver preloads only torch and dflash_kernels (one import for every rank of every test)."""

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import dflash_kernels
from dflash_kernels import vocab_parallel as vp

NAN = float("nan")


def pad(t, width, fill):
    """``t`` padded on the last dim to ``width`` with ``fill`` and NaN (garbage the op must skip)."""
    extra = torch.full((*t.shape[:-1], width - t.shape[-1]), fill, dtype=t.dtype)
    extra.view(-1)[::3] = NAN
    return torch.cat([t, extra], -1)


def shard_kw(V, borders, kw, rank):
    """Rank's kwargs: logits / draft_probs columns ``borders[rank] .. borders[rank+1]`` of the
    padded tensors; returns (kwargs, vocab_start)."""
    lo, hi = borders[rank], borders[rank + 1]
    out = dict(kw)
    big = torch.finfo(kw["logits"].dtype).max
    out["logits"] = pad(kw["logits"], borders[-1], big)[..., lo:hi].contiguous()
    if kw.get("draft_probs") is not None:
        out["draft_probs"] = pad(kw["draft_probs"], borders[-1], 0.5)[..., lo:hi].contiguous()
    return out, lo


def call(kw, **extra):
    """verify_chain with garbage-prefilled outputs; returns the 4 outputs."""
    B, S = kw["block_tokens"].shape
    out = tuple(torch.full(shape, -777, dtype=torch.int32) for shape in ((B,), (B, S), (B,)))
    out += (torch.full((B,), -777, dtype=torch.int32) if kw.get("seq_lens") is not None else None,)
    kw = dict(kw)
    logits, bt = kw.pop("logits"), kw.pop("block_tokens")
    res = dflash_kernels.verify_chain(logits, bt, out=out, **kw, **extra)
    assert all(a is b for a, b in zip(res, out))
    return tuple(res)


def worker(rank, world, init_file, case_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    results = []
    try:
        for V, borders, kw in torch.load(case_file):
            skw, lo = shard_kw(V, borders, kw, rank)
            log = []
            vp.collective_log = log
            res = call(skw, tp_group=dist.group.WORLD, vocab_start=lo, vocab_size=V)
            vp.collective_log = None
            results.append((res, log))
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def hang(rank, world, init_file, case_file, out_dir):
    """A rank that never finishes (tests the harness's deadline)."""
    time.sleep(3600)
