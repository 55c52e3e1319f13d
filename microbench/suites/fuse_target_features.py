"""Suite ``fuse_target_features``: the drafter's context feature from the
target's hidden states of the committed tokens. Inputs and checks: _common.py."""

import functools

from . import _common

OPS = ("fuse_target_features",)
SWEEPS_CTX = False    # the context length plays no part
build_case = functools.partial(_common.build_case, "fuse_target_features")
