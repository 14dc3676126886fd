"""KV events of a worker without KVBM: its G1 blocks, bridged by the wrapper.

Such a worker has no connector inside vLLM, hence no leader and no publisher there; the wrapper
(which knows the worker id, the deployment and the NATS URL from `DYNKV_KV_EVENTS_*`) runs the
publisher itself and feeds it with vLLM's own KV events through the G1 bridge, so the router
still sees where each prefix is (docs/kv-events.md). Its keys are rooted in `g1_fingerprint`
(model name and block size: there is no block layout to fingerprint), which it announces like any
worker. It measures no rates: the router uses its defaults for prefill, and G2/G3 do not exist.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from dynkv.kvbm.event_publisher import KvEventPublisher
from dynkv.kvbm.event_settings import KvEventsSettings
from dynkv.kvbm.g1_bridge import G1Bridge
from dynkv.kvbm.g1_events import G1Translator, g1_fingerprint
from dynkv.kvbm.keys import BlockHasher


@dataclass
class G1Events:
    publisher: KvEventPublisher
    bridge: G1Bridge

    def close(self) -> None:
        self.bridge.close()
        self.publisher.close()


def _show_kvbm_logs() -> None:
    """The bridge and publisher log on `dynkv.kvbm`; in the wrapper they go to its stderr."""
    logger = logging.getLogger("dynkv.kvbm")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[dynkv.worker] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def start_g1_events(model: str, block_size: int, settings: KvEventsSettings) -> G1Events | None:
    """Publisher and bridge, started, when `settings` name both a NATS URL and vLLM's endpoint;
    None otherwise (a one-line reason on stderr when the settings are unusable)."""
    if not settings.nats_url or not settings.g1_endpoint:
        return None
    _show_kvbm_logs()
    try:
        fingerprint = g1_fingerprint(model, block_size)
        publisher = KvEventPublisher(settings, block_size=block_size, fingerprint=fingerprint.hex())
        translator = G1Translator(BlockHasher(fingerprint, block_size), settings.g1_max_blocks)
        bridge = G1Bridge(settings.g1_endpoint, translator, publisher)
    except ValueError as exc:
        logging.getLogger("dynkv.kvbm").warning("KV events are off: %s", exc)
        return None
    publisher.start()
    return G1Events(publisher, bridge.start())
