"""Rank side of tests/test_verify_chain_tp.py and tests/test_verify_tree_tp.py, and the
harness that starts the ranks (:func:`spawn`): kept free of pytest / scipy so that a spawned
rank imports only torch and dflash_kernels."""

import os
import pickle
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
    """verify_chain (or verify_tree, when ``kw`` has ``parents``) with garbage-prefilled
    outputs; returns the outputs."""
    if "parents" in kw:
        return call_tree(kw, **extra)
    B, S = kw["block_tokens"].shape
    out = tuple(torch.full(shape, -777, dtype=torch.int32) for shape in ((B,), (B, S), (B,)))
    out += (torch.full((B,), -777, dtype=torch.int32) if kw.get("seq_lens") is not None else None,)
    kw = dict(kw)
    logits, bt = kw.pop("logits"), kw.pop("block_tokens")
    res = dflash_kernels.verify_chain(logits, bt, out=out, **kw, **extra)
    assert all(a is b for a, b in zip(res, out))
    return tuple(res)


def call_tree(kw, **extra):
    """verify_tree with garbage-prefilled outputs; returns the 5 outputs."""
    B, N = kw["tree_tokens"].shape
    full = lambda *shape: torch.full(shape, -777, dtype=torch.int32)  # noqa: E731
    out = (full(B), full(B, N), full(B, N), full(B),
           full(B) if kw.get("seq_lens") is not None else None)
    kw = dict(kw)
    logits, tt, par = kw.pop("logits"), kw.pop("tree_tokens"), kw.pop("parents")
    res = dflash_kernels.verify_tree(logits, tt, par, out=out, **kw, **extra)
    assert all(a is b for a, b in zip(res, out))
    return tuple(res)


def _plain(res):
    """Outputs as (dtype name, nested lists) or None: pickled without torch's storage records."""
    return tuple(None if t is None else (str(t.dtype).removeprefix("torch."), t.tolist())
                 for t in res)


def _tensors(res):
    return tuple(None if t is None else torch.tensor(t[1], dtype=getattr(torch, t[0]))
                 for t in res)


def worker(rank, world, init_file, cases, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    results = []
    try:
        for V, borders, kw in cases:
            skw, lo = shard_kw(V, borders, kw, rank)
            log = []
            vp.collective_log = log
            res = call(skw, tp_group=dist.group.WORLD, vocab_start=lo, vocab_size=V)
            vp.collective_log = None
            results.append((_plain(res), log))
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
    finally:
        dist.destroy_process_group()


def hang(rank, world, init_file, cases, out_dir):
    """A rank that never finishes (tests the harness's deadline)."""
    time.sleep(3600)


SPAWN_TIMEOUT_S = 150


def _context():
    # fork by default: a spawned (or forkserver) rank re-imports torch and dflash_kernels,
    # measured 30-38 s per world size on this shared 2-core machine (fork: 1.5-4 s). The
    # parent never starts a process group, and ranks run single-threaded.
    # DFLASH_TP_TEST_START=spawn runs the same tests with spawned ranks.
    return mp.get_context(os.environ.get("DFLASH_TP_TEST_START", "fork"))


def spawn(world, cases, tmp_path, target=worker, timeout_s=SPAWN_TIMEOUT_S):
    """Run ``target`` on ``world`` ranks over ``cases`` ((V, borders, kwargs) each); returns
    every rank's results. Joined with a deadline, then terminated: no rank outlives the call."""
    # The cases travel as process arguments (a forked rank inherits them, a spawned one gets
    # them through torch.multiprocessing's shared-memory pickler) and the results come back
    # as plain lists: in the full suite a torch.save'd case file twice came back with a
    # storage recorded as 0 bytes beside a 128-byte record, and every rank failed to load it.
    procs = [_context().Process(target=target, args=(r, world, str(tmp_path / "store"), cases,
                                                str(tmp_path)), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.terminate()
        for p in alive:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    assert not alive, f"world {world}: ranks still running after {timeout_s} s (killed)"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"world {world}: exit codes {codes}"
    per_rank = []
    for r in range(world):
        with open(tmp_path / f"{r}.pkl", "rb") as f:
            per_rank.append([(_tensors(res), log) for res, log in pickle.load(f)])
    return per_rank
