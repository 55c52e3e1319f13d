"""Constants of the value edge-case rules every backend applies identically
(docs/DESIGN.md, "Edge values"). csrc/verify_chain.cuh restates them in C++."""

from __future__ import annotations

# verify_chain: a request samples iff ``temperature[b] >= SAMPLING_EPS`` (compared
# in fp32; NaN, negative and tiny temperatures are greedy). vLLM's sampling epsilon:
# below it ``1 / T`` overflows ordinary logits to inf and the T -> 0 limit is greedy.
SAMPLING_EPS = 1e-5

# draft_probs: a residual ``max(p - q, 0)`` whose total mass is below RESIDUAL_EPS
# is fp32 rounding noise of p ~ q (its size is each backend's summation order), so
# it counts as zero and the bonus is drawn from p. Rounding gives masses of order
# 1e-7 * ulps; a real residual this small is rejected with probability < 1e-5 anyway.
RESIDUAL_EPS = 1e-5
