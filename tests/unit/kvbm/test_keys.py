"""Block keys: deterministic, chained, salted, identical across processes."""

from __future__ import annotations

import json
import subprocess
import sys

from dynkv.kvbm.keys import BlockHasher
from dynkv.kvbm.layout import BlockLayout

LAYOUT = BlockLayout("m", "bfloat16", 32, 12, 73728)


def test_only_full_blocks_have_keys():
    h = BlockHasher(LAYOUT.fingerprint(), 32)
    assert len(h.keys(list(range(31)))) == 0
    assert len(h.keys(list(range(32)))) == 1
    assert len(h.keys(list(range(95)))) == 2


def test_chain_prefix_property():
    h = BlockHasher(LAYOUT.fingerprint(), 32)
    a = h.keys(list(range(128)))
    b = h.keys(list(range(96)) + [7] * 32)
    assert a[:3] == b[:3] and a[3] != b[3]
    # a different early block changes every later key
    c = h.keys([1] + list(range(1, 128)))
    assert all(x != y for x, y in zip(a, c, strict=True))


def test_continuing_a_chain_equals_hashing_from_scratch():
    h = BlockHasher(LAYOUT.fingerprint(), 32)
    tokens = list(range(200))
    full = h.keys(tokens)
    head = h.keys(tokens[:96])
    assert head + h.keys(tokens, start=3, parent=head[-1]) == full


def test_salt_and_fingerprint_isolate():
    h = BlockHasher(LAYOUT.fingerprint(), 32)
    tokens = list(range(64))
    assert h.keys(tokens, extra=["tenant-a"]) != h.keys(tokens, extra=["tenant-b"])
    assert h.keys(tokens) != h.keys(tokens, extra=["tenant-a"])
    other = BlockLayout("m", "float16", 32, 12, 73728)
    assert BlockHasher(other.fingerprint(), 32).keys(tokens) != h.keys(tokens)
    # length-prefixed extras: ("ab","c") differs from ("a","bc")
    assert h.keys(tokens, extra=["ab", "c"]) != h.keys(tokens, extra=["a", "bc"])


_CHILD = """
import json, sys
from dynkv.kvbm.keys import BlockHasher
from dynkv.kvbm.layout import BlockLayout
layout = BlockLayout("m", "bfloat16", 32, 12, 73728)
h = BlockHasher(layout.fingerprint(), 32)
print(json.dumps([str(k) for k in h.keys(list(range(300)), extra=["salt"])]))
"""


def test_identical_in_two_separate_processes():
    outs = []
    for seed in ("1", "2"):  # different hash seeds must not matter
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
        )
        outs.append(json.loads(proc.stdout))
    h = BlockHasher(LAYOUT.fingerprint(), 32)
    here = [str(k) for k in h.keys(list(range(300)), extra=["salt"])]
    assert outs[0] == outs[1] == here
