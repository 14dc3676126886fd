"""How greedy outputs of two vLLM runs are compared (issue: assert what dynkv guarantees).

Token ids are compared exactly: the KV bytes dynkv onboards are the bytes vLLM computed, so the
greedy tokens cannot change. Logprobs are compared exactly only between runs that compute the
same batch the same way; between runs whose kernel paths differ (a cold prefill of the whole
prompt against a prefix-cache hit, a KVBM onboarding or a disagg handoff that computes only the
uncached tail, in batches of another shape), they are compared within LOGPROB_TOLERANCE. The
CPU's matmul and attention kernels (oneDNN; AVX-512 or AMX where the CPU has them) choose their
blocking by shape, so the float summation order, and the last bits of the logits, differ between
such runs on some CPUs and not on others.
"""

from __future__ import annotations

from collections.abc import Sequence

# The largest |Δ logprob| of a chosen token accepted between runs whose kernel paths differ.
# Measured: 0.0077 on a Xeon with AVX-512 and AMX-BF16, 0.0 on an AMD EPYC with AVX-512. A bf16
# model's logits carry about three significant digits, so this is well above reordering noise,
# and far below what wrong KV does to a logprob (whole units, and other tokens).
LOGPROB_TOLERANCE = 0.05


def logprob_gap(got: Sequence[Sequence[float]], want: Sequence[Sequence[float]]) -> float:
    """The largest |Δ| between two runs' per-token logprobs (one sequence per request)."""
    gaps = [abs(a - b) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True)]
    return max(gaps, default=0.0)
