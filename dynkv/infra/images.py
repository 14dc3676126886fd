"""The container images dynkv can run (etcd and NATS for `--infra docker`, Prometheus for
`--observability` without a binary), and whether a reference is pinned by digest.

A tag (`nats:2.11.4`) is a name the registry may point at other bytes tomorrow; a digest
(`nats:2.11.4@sha256:…`) is the bytes. The defaults are tags: dynkv's build machines cannot reach
a registry to read and verify the digests, so none is shipped that was not checked. The settings
`DYNKV_ETCD_IMAGE`, `DYNKV_NATS_IMAGE` and `DYNKV_PROMETHEUS_IMAGE` take a pinned reference, and
the `plan.images` check warns about every image the plan runs unpinned (docs/security.md).
"""

from __future__ import annotations

import re

ETCD_IMAGE = "quay.io/coreos/etcd:v3.6.1"
NATS_IMAGE = "nats:2.11.4"
# The version Debian 12 packages, so the binary and the image behave alike.
PROMETHEUS_IMAGE = "prom/prometheus:v2.42.0"

# name[:tag][@sha256:<64 hex>]; the name as Docker spells repositories (lower case, registry
# host with an optional port first)
_REFERENCE = re.compile(
    r"^(?P<name>[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>[a-z0-9]+:[A-Za-z0-9=_-]+))?$"
)
_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")


def reference_problem(ref: str) -> str | None:
    """Why `ref` is not an image reference dynkv accepts, or None."""
    match = _REFERENCE.match(ref)
    if not match:
        return f"{ref!r} is not an image reference (name[:tag][@sha256:<digest>])"
    digest = match.group("digest")
    if digest is not None and not _SHA256.match(digest):
        return f"{ref!r}: a digest is sha256: and 64 lower-case hex digits"
    return None


def is_pinned(ref: str) -> bool:
    """True when `ref` names its bytes: a valid sha256 digest."""
    match = _REFERENCE.match(ref)
    return bool(match and match.group("digest") and _SHA256.match(match.group("digest")))
