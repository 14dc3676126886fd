"""The G1 bridge: vLLM's KV events (ZMQ) in, G1 events on the worker's KV event stream out.

A daemon thread subscribes to the endpoint of vLLM's `--kv-events-config` (a private ipc:// path
the plan chooses), decodes each batch, translates it into this runtime's keys
(`dynkv.kvbm.g1_events`) and hands the changes to the worker's `KvEventPublisher`, so that G1 and
G2/G3 changes of one worker share one ordered stream, one sequence and one snapshot
(docs/kv-events.md). It runs inside vLLM's EngineCore beside the KVBM connector's scheduler half,
or, for a worker without KVBM, in the worker wrapper (`dynkv.worker.g1_events`).

vLLM numbers its batches from 0; a missing number (the subscriber's queue overflowed, or it
connected after the first batch) or an undecodable batch means blocks the bridge never saw: it
then reports G1 cleared and starts over, so the router forgets this worker's G1 blocks rather than
keep stale ones (blocks stored before that are re-learned only when vLLM stores them again).
Never raises into its host: a failure is logged and the thread ends.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from dynkv.kvbm.background import Background
from dynkv.kvbm.g1_events import BadPayload, G1Sink, G1Translator, decode_batch

if TYPE_CHECKING:
    from dynkv.kvbm.event_publisher import KvEventPublisher
    from dynkv.kvbm.keys import BlockHasher

log = logging.getLogger("dynkv.kvbm")

RCV_HWM = 100_000  # vLLM's own PUB high-water mark: a slow bridge loses batches only past it
POLL_MS = 100


class G1Bridge(Background):
    thread_name = "dynkv-g1-events"

    def __init__(self, endpoint: str, translator: G1Translator, sink: G1Sink) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.translator = translator
        self.sink = sink
        self.batches = 0  # vLLM batches applied
        self.gaps = 0  # times the bridge lost track and reported G1 cleared
        self.last_seq: int | None = None
        self.subscribed = threading.Event()  # the socket is connecting (tests wait on it)

    def _run(self) -> None:
        try:
            import zmq
        except ImportError:
            log.warning("KVBM: pyzmq is not installed; no G1 KV events")
            return
        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.RCVHWM, RCV_HWM)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(self.endpoint)  # retried by ZMQ until vLLM binds it
            self.subscribed.set()
            log.info("KVBM: bridging vLLM's KV events from %s into G1 events", self.endpoint)
            while not self._stop.is_set():
                if not sock.poll(POLL_MS):
                    continue
                self.on_message(sock.recv_multipart())
        except Exception:
            log.warning("KVBM: the G1 KV event bridge stopped", exc_info=True)
        finally:
            sock.close(0)
            ctx.term()

    def on_message(self, frames: list[bytes]) -> None:
        """One message of vLLM's publisher: [topic, seq (8 bytes, big-endian), payload]."""
        if len(frames) != 3 or len(frames[1]) != 8:
            self._lost("a message that is not vLLM's [topic, seq, batch]")
            return
        seq = int.from_bytes(frames[1], "big")
        expected = 0 if self.last_seq is None else self.last_seq + 1
        self.last_seq = seq
        if seq != expected:
            self._lost(f"batch {seq} arrived, {expected} was next")
        try:
            events = decode_batch(frames[2])
        except BadPayload as exc:
            self._lost(f"an undecodable batch ({exc})")
            return
        self.translator.apply(events, self.sink)
        self.batches += 1

    def _lost(self, why: str) -> None:
        self.gaps += 1
        log.warning("KVBM: G1 events lost track (%s); reporting G1 cleared", why)
        self.translator.reset(self.sink)


def start_for(publisher: KvEventPublisher | None, hasher: BlockHasher) -> G1Bridge | None:
    """The bridge `publisher`'s settings ask for (`DYNKV_KV_EVENTS_G1_ENDPOINT`), feeding it and
    keying blocks with `hasher`, started; None without a publisher or an endpoint, or when it
    cannot start (the engine serves on without G1 events)."""
    if publisher is None or not publisher.settings.g1_endpoint:
        return None
    try:
        translator = G1Translator(hasher, publisher.settings.g1_max_blocks)
        return G1Bridge(publisher.settings.g1_endpoint, translator, publisher).start()
    except Exception as exc:
        log.warning("KVBM: no G1 KV events: %s", exc)
        return None
