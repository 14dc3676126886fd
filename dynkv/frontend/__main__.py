"""`python -m dynkv.frontend --deployment NAME --etcd-endpoints URL …`: serve until SIGTERM.

uvicorn runs the app with a bounded graceful shutdown, so `dynkv down` (SIGTERM, then SIGKILL
after its grace period) finds it gone while streams are still being drained for a few seconds.
"""

from __future__ import annotations

import logging
import logging.config
import sys

import uvicorn

from dynkv.frontend.app import create_app
from dynkv.frontend.config import parse_args, plaintext_key_warning
from dynkv.frontend.logs import log_config
from dynkv.plan.model import redact_urls

GRACEFUL_SHUTDOWN_SECS = 5
# How long the event loop may hold the GIL while the kv router's tokenizer thread waits for it
# (CPython's default is 5 ms). Tokenizing a chat hands the GIL back and forth between Python
# (the chat template) and the tokenizer's native code; at 5 ms a handoff, a prompt tokenized in
# 5 ms on an idle frontend took 20 ms beside a busy event loop (docs/frontend.md#the-kv-policy).
GIL_SWITCH_INTERVAL_SECS = 0.0005


def main(argv: list[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECS)
    logs = log_config(config.log_level)
    logging.config.dictConfig(logs)
    log = logging.getLogger("dynkv.frontend")
    log.info(
        "serving the OpenAI API on %s://%s:%d for deployment %r (router %s, API key %s, etcd %s)",
        "https" if config.tls_cert else "http",
        config.host,
        config.port,
        config.deployment,
        config.router,
        "required" if config.api_key else "not required",
        redact_urls(",".join(config.etcd_endpoints)),  # a URL may carry a password
    )
    warning = plaintext_key_warning(config)
    if warning:
        log.warning(warning)
    if not config.loopback and not config.api_key:
        log.warning("--insecure: anyone who reaches %s may use this frontend", config.host)
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_config=logs,
        log_level=config.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECS,
        ssl_certfile=str(config.tls_cert) if config.tls_cert else None,
        ssl_keyfile=str(config.tls_key) if config.tls_key else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
