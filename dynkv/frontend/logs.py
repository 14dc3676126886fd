"""Log set-up of the frontend process: one format for uvicorn's lines and ours, on stderr (the
supervisor writes it to the service's log file), without the access lines of `/health` and
`/metrics`, which the supervisor, `dynkv status` and Prometheus poll every second or so and
which would bury every request line in `dynkv logs -f frontend`."""

from __future__ import annotations

import logging
from typing import Any

QUIET_PATHS = ("/health", "/metrics")
FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


class QuietProbes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn.access: (client, method, path, http_version, status)
        if isinstance(args, tuple) and len(args) >= 3 and args[1] == "GET":
            return str(args[2]).split("?")[0] not in QUIET_PATHS
        return True


def log_config(level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` for uvicorn's `log_config`."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"quiet_probes": {"()": QuietProbes}},
        "formatters": {"plain": {"format": FORMAT}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "stream": "ext://sys.stderr",
            },
            "access": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "stream": "ext://sys.stderr",
                "filters": ["quiet_probes"],
            },
        },
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["access"], "level": level, "propagate": False},
            "dynkv.frontend": {"handlers": ["stderr"], "level": level, "propagate": False},
            # the KV router runs in the frontend's process: its lines (NATS down, the decision
            # trace) belong in the same log, formatted alike
            "dynkv.router": {"handlers": ["stderr"], "level": level, "propagate": False},
        },
    }
