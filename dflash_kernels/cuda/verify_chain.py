"""verify_chain on the compiled kernels: greedy and keyed point-mass sampling."""

from __future__ import annotations

from . import IMPL

# The compiled kernels do no top-k / top-p filtering, no rejection sampling
# against draft distributions and no ragged (cu_rows) layout: the registry
# sends calls with any of these to another backend. The C++ op rejects the
# first three too; cu_rows and filter_order never reach it.
UNSUPPORTED_ARGS = frozenset({"top_k", "top_p", "draft_probs", "cu_rows", "filter_order"})

# The extension's binding called without the dispatcher (csrc/bindings/direct.cpp;
# torch.ops.dflash.verify_chain_cuda runs the same host path), or the NVRTC path.
if IMPL == "extension":
    from .. import _C

    _op = _C.verify_chain_cuda
else:
    from ._jit import verify_chain as _op


def verify_chain(logits, block_tokens, num_drafts, temperature, top_k, top_p, seeds, positions,
                 draft_probs, seq_lens, cu_rows, filter_order, accept_len, out_tokens, bonus,
                 new_seq_lens) -> None:
    """logits ``[B, S, V]`` fp32/fp16/bf16 (unit last stride); dense int32 /
    int64 / fp32 per-request vectors; outputs int32, written in place."""
    _op(logits, block_tokens, num_drafts, temperature, top_k, top_p, seeds, positions,
        draft_probs, seq_lens, accept_len, out_tokens, bonus, new_seq_lens)
