"""The OpenAI-compatible frontend of a dynkv deployment (`python -m dynkv.frontend`).

It discovers the workers in etcd (`/dynkv/<deployment>/workers/`), keeps only healthy ones in
rotation, and routes `/v1/chat/completions` and `/v1/completions` to them, relaying streamed
answers chunk by chunk. Modules, from the wire inwards:

- `app`: FastAPI routes, `/health`, `/metrics`, lifespan (background tasks, the shared client);
- `config`: typed settings (`DYNKV_FRONTEND_*` or `--flags`; secrets from the environment or a
  file only);
- `auth`: the optional bearer API key (docs/security.md);
- `protocol` / `errors`: what the frontend reads of a request; OpenAI-shaped errors;
- `router`: serving strategies (`Aggregated`; disagg plugs in here), worker choice and retry;
- `policy`: round_robin / least_outstanding / session (affinity);
- `upstream`: the shared httpx client, sending and relaying;
- `pool` / `discovery`: registered workers and their health, kept true from etcd;
- `metrics`: the frontend's own Prometheus registry.

`dynkv.kvbm` never imports this package (the runtime lives inside vLLM, the frontend outside).
"""

from dynkv.frontend.config import FrontendConfig, parse_args

__all__ = ["FrontendConfig", "create_app", "parse_args"]


def create_app(*args, **kwargs):
    """`dynkv.frontend.app.create_app`, imported on first use (FastAPI is not needed to parse
    arguments or build a plan)."""
    from dynkv.frontend.app import create_app as create

    return create(*args, **kwargs)
