"""What a worker process adds to vLLM's OpenAI server: discovery registration in etcd.

`python -m dynkv.worker --role agg ... -- <vllm argv>` runs vLLM as its child (same process
group), registers once vLLM's `/health` answers 200, keeps the registration's lease alive, and
withdraws it when either side stops. See `dynkv.worker.wrapper`.
"""
