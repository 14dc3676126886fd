"""Make the runtime's log lines visible inside vLLM's processes.

vLLM configures handlers for its own `vllm` logger only; lines of `dynkv.kvbm` would vanish. The
connector calls `ensure_handler()` once per process: a stream handler in vLLM's style, unless the
host application already configured logging for us (then we stay out of its way).
"""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "(%(processName)s pid=%(process)d) %(levelname)s %(asctime)s [dynkv.kvbm] %(message)s"


def ensure_handler() -> None:
    logger = logging.getLogger("dynkv")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("DYNKV_LOG_LEVEL", "INFO").upper())
    logger.propagate = False
