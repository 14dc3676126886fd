"""Transport security for a deployment other hosts reach (`dynkv up --advertise`): docs/multi-host.md.

`ca` makes and loads the per-deployment certificate authority; `model` is the plan's typed record
of which files each service and client uses.
"""
