"""Suite ``write_kv``: given K/V of the committed tokens into the draft cache. Inputs and checks: _common.py."""

import functools

from . import _common

OPS = ("write_kv",)
SWEEPS_CTX = False    # the context length only moves the RoPE positions
build_case = functools.partial(_common.build_case, "write_kv")
