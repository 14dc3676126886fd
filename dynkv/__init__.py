"""dynkv: one-command KV-cache offloading for vLLM, with a bundled KV block manager runtime."""

__version__ = "0.1.0"
