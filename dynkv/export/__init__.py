"""`dynkv export`: the deployment `dynkv up` would run, as a compose file or Kubernetes manifests.

An exporter is a pure function, plan → documents (plain dicts): `compose.compose_file` and
`kubernetes.manifests`. What a plan says about *this* host (loopback binds, /dev/shm, state-dir
paths, CUDA_VISIBLE_DEVICES, CPU bindings, secrets) is translated once, for both targets, by
`containers.translate`; `render` turns documents into YAML. The container side lives here too:
`entrypoint` (the image's ENTRYPOINT) and `healthcheck` (the plan's probes, run in a container).
User guide: docs/export.md.
"""

from dynkv.export.containers import ExportError, ExportOptions, G3Volume, parse_g3_volume

__all__ = ["ExportError", "ExportOptions", "G3Volume", "parse_g3_volume"]
