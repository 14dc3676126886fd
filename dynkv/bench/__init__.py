"""Benchmarks: tier throughput, offload TTFT in vLLM, and serving workloads. Not tests: they
report ratios measured side by side in one run."""
