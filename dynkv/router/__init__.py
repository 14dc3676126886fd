"""The KV-aware router's core: the fleet-wide block index, its event sync, and TTFT scoring.

- `index`: key → where each worker holds it (bounded), and prefix matches;
- `sync`: applies each worker's KV events in order, resynchronising by snapshot on a gap;
- `subscriber`: the NATS side (events in, snapshot requests out);
- `score`: estimated time to first token per worker, and the choice among them; `decide`: one
  decision; `router`: all of it behind one object for a frontend (`KvRouter.pick(Prompt, …)`);
- `bench`: decision time at fleet scale (`dynkv bench router`).
Event schema: `dynkv.kvbm.events` (docs/kv-events.md).
"""
