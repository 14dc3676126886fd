"""The bundled KV block manager (KVBM) runtime.

A library that vLLM loads inside its own processes: it must import nothing else from dynkv (not the
CLI, the supervisor or the frontend), and its configuration arrives through `DYN_KVBM_*` variables.
"""
