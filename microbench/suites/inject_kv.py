"""Suite ``inject_kv``: the KV projection of the committed tokens into
the draft cache; op ``injection`` is the whole step (fuse_target_features,
then inject_kv). Inputs and checks: _common.py."""

import functools

from . import _common

OPS = ("inject_kv", "injection")
SWEEPS_CTX = False    # the context length only moves the RoPE positions
build_case = functools.partial(_common.build_case, "inject_kv")
