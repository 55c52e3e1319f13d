"""The op table: one schema per op, the one contract between the public
functions, the ``torch.ops.dflash.*`` custom ops and every backend.

Each entry is a TorchScript schema (the argument list of the op). From it come
the custom op ``torch.ops.dflash.<name>`` (with a trailing ``str backend``
argument, returning nothing), its fake implementation (a no-op: every op only
mutates the outputs marked ``(x!)``), the names of its optional arguments (which
the registry's capability checks read), and the positional order of every
backend's function ``dflash_kernels.<backend package>.<name>.<name>``. ``ops.py``
defines the custom ops from this table.

Adding an op: add its schema here, its public function in ``ops.py`` and one
module per backend named after the op (CONTRIBUTING.md).
"""

from __future__ import annotations

import re
from typing import Dict, NamedTuple, Tuple

SCHEMAS: Dict[str, str] = {
    "block_attention": (
        "Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor context_lens, "
        "Tensor? k_block, Tensor? v_block, float sm_scale, int window, Tensor? k_scale, "
        "Tensor? v_scale, Tensor(a!) out, Tensor(b!)? lse, bool causal, Tensor? mask_bits"),
    "fuse_target_features": (
        "Tensor[] features, Tensor fc_weight, Tensor norm_weight, float eps, Tensor(a!) out"),
    "inject_kv": (
        "Tensor hidden, Tensor kv_weight, Tensor? kv_bias, Tensor? k_norm_weight, "
        "Tensor positions, Tensor slot_mapping, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, "
        "Tensor cos_sin_cache, float eps, bool rope_neox, int rotary_dim, Tensor? k_scale, "
        "Tensor? v_scale"),
    "write_kv": (
        "Tensor k, Tensor v, Tensor? k_norm_weight, Tensor positions, Tensor slot_mapping, "
        "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor cos_sin_cache, float eps, "
        "bool rope_neox, int rotary_dim, Tensor? k_scale, Tensor? v_scale"),
    # cu_rows: the ragged layout (logits [T, V], block_tokens [T]; max_rows is
    # out_tokens' width). filter_order: None (sequential, the default) or
    # "joint"; ops.verify_chain passes "joint" only when it changes the kept set
    # (top_k and top_p both given), so a backend without it is skipped then only.
    "verify_chain": (
        "Tensor logits, Tensor block_tokens, Tensor num_drafts, Tensor? temperature, "
        "Tensor? top_k, Tensor? top_p, Tensor? seeds, Tensor? positions, Tensor? draft_probs, "
        "Tensor? seq_lens, Tensor? cu_rows, str? filter_order, Tensor(a!) accept_len, "
        "Tensor(b!) out_tokens, Tensor(c!) bonus, Tensor(d!)? new_seq_lens"),
    "tree_mask": "Tensor parents, Tensor(a!) mask, Tensor(b!) depth",
    "verify_tree": (
        "Tensor logits, Tensor tree_tokens, Tensor parents, Tensor? num_nodes, "
        "Tensor? temperature, Tensor? top_k, Tensor? top_p, Tensor? seeds, Tensor? positions, "
        "Tensor? seq_lens, Tensor(a!) accept_len, Tensor(b!) accepted_nodes, "
        "Tensor(c!) out_tokens, Tensor(d!) bonus, Tensor(e!)? new_seq_lens"),
    "build_tree": (
        "Tensor draft_logits, int top_k, Tensor? temperature, Tensor(a!) tree_tokens, "
        "Tensor(b!) parents, Tensor(c!) num_nodes, Tensor(d!) depth"),
    "norm_rope": (
        "Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos_sin_cache, "
        "Tensor? q_norm_weight, Tensor? k_norm_weight, float eps, bool rope_neox, int rotary_dim"),
    "copy_kv": "Tensor src_slots, Tensor dst_slots, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches",
}

_ARG = re.compile(r"^\s*(?P<type>[A-Za-z]+)(?P<alias>\([a-z]!\))?(?P<list>\[\])?(?P<opt>\?)?\s+(?P<name>\w+)\s*$")


class OpSchema(NamedTuple):
    name: str
    schema: str                       # the argument list, as in SCHEMAS
    args: Tuple[str, ...]             # argument names, in backend order
    optional: Tuple[Tuple[int, str], ...]   # (position, name) of the optional (``Tensor?``, ``str?``) inputs
    mutated: Tuple[str, ...]          # outputs the op writes


def parse(name: str, schema: str) -> OpSchema:
    args, optional, mutated = [], [], []
    for i, text in enumerate(schema.split(",")):
        m = _ARG.match(text)
        if m is None:
            raise ValueError(f"schema of {name}: cannot parse argument {text!r}")
        args.append(m["name"])
        if m["alias"]:
            mutated.append(m["name"])
        elif m["opt"]:
            optional.append((i, m["name"]))
    return OpSchema(name, schema, tuple(args), tuple(optional), tuple(mutated))


OPS: Dict[str, OpSchema] = {name: parse(name, s) for name, s in SCHEMAS.items()}
