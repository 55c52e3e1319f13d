"""What the tree suites (tree_mask, verify_tree, copy_kv, block_attention's ``tree`` row)
share: the node counts, random bushy trees, and the count of a baseline's device ops.

Trees: ``parents[b, i]`` uniform in ``[0, i)`` for every slot ``i > 0`` (every slot
used; a "bushy" tree, depth about ln N), drawn from a fixed seed on the CPU, so a
case's tree is the same on every device and run.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

NODES = (16, 32, 64, 128)

# Ops that allocate without writing (no kernel on a GPU).
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh"}


def node_modes(prefix: str = "") -> tuple:
    """``("n16", "n32", ...)``, or ``("greedy-n16", ...)`` with a prefix."""
    return tuple(f"{prefix}{'-' if prefix else ''}n{n}" for n in NODES)


def nodes_of(mode: str) -> int:
    """``"greedy-n64"`` / ``"n64"`` -> 64."""
    return int(mode.rsplit("n", 1)[1])


def random_parents(batch: int, n: int, seed: int) -> torch.Tensor:
    """int32 ``[batch, n]`` (CPU): parents[b, 0] = -1, parents[b, i] uniform in [0, i)."""
    gen = torch.Generator().manual_seed(seed + 7)
    i = torch.arange(n, dtype=torch.float64)
    par = (torch.rand((batch, n), generator=gen, dtype=torch.float64) * i).floor().to(torch.int32)
    par[:, 0] = -1
    return par


def depths(parents: torch.Tensor) -> torch.Tensor:
    """int64 ``[B, N]`` depth of every slot of dense SPEC parents (host loop: inputs only)."""
    par = parents.cpu().to(torch.int64)
    d = torch.zeros_like(par)
    for i in range(1, par.shape[1]):
        d[:, i] = d.gather(1, par[:, i:i + 1]).squeeze(1) + 1
    return d


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.syncs = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.syncs += 1
        elif not func.is_view and name not in _NO_KERNEL:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def count_device_ops(fn, inp: dict) -> dict:
    """Run ``fn(inp)`` once and count the ATen ops it dispatches that launch work on a
    GPU (views and bare allocations excluded: each counted op is at least one kernel
    launch) and its host synchronisations (``.item()``-like reads)."""
    with _Counter() as c:
        fn(inp)
    return {"ops": c.ops, "host_syncs": c.syncs}


def node_case(suite: str, ops, ours, baseline, count_inputs: dict, *, op, mode, shape, batch, ctx,
              dtype, device, interpret, make_inputs, nbytes, outputs, launches, **extra):
    """The Case of a tree suite: our backends (``ours(backend)`` runs one) and the
    PyTorch ``baseline``, the reference backend as oracle, exact comparison, and
    the baseline's device ops counted on ``count_inputs`` (CPU, batch 1)."""
    from ..case import Case, Impl, equal
    from . import our_backends, pick_oracle

    impls = [Impl(b, "ours", ours(b)) for b in our_backends(ops, device, interpret)]
    impls.append(Impl("torch", "baseline", baseline))
    counted = count_device_ops(baseline, count_inputs)
    return Case(
        suite=suite, op=op, mode=mode, shape=shape, dtype=dtype, batch=batch, ctx=ctx,
        make_inputs=make_inputs, impls=impls, oracle=pick_oracle(impls), compare=equal,
        nbytes=nbytes, outputs=outputs,
        extra={"n_nodes": nodes_of(mode), **extra, "launches": dict(launches),
               "torch_ops": counted["ops"], "torch_host_syncs": counted["host_syncs"]})
