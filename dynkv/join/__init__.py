"""Joining hosts to a deployment (`dynkv join-token`, `dynkv join`): docs/multi-host.md.

`token` is the join token (one typed record, encoded with a MAC), `issue` makes one on the first
host, `enroll` trades it for the node's own certificate, `placement` says where workers may run,
`keys` holds the first host's join key and the used token ids.
"""
