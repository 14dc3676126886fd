"""The generated tiny model on real vLLM (CPU): it loads as LlamaForCausalLM and decodes greedily,
the same tokens twice, through both the completion and the chat (template) paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from dynkv.model import ensure_model
from dynkv.model.tokenizer import corpus

pytestmark = pytest.mark.e2e

# vLLM starts worker processes with spawn: its entry point must sit behind a __main__ guard, so it
# runs in a script of its own rather than inside pytest.
SCRIPT = textwrap.dedent(
    """
    import json, sys

    if __name__ == "__main__":
        from vllm import LLM, SamplingParams

        model, prompt = sys.argv[1], sys.argv[2]
        llm = LLM(model=model, dtype="bfloat16", max_model_len=1024, block_size=32,
                  enforce_eager=True, seed=0)
        greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        runs = [llm.generate([prompt], greedy)[0] for _ in range(2)]
        chat = llm.chat([{"role": "user", "content": "Hello there"}], greedy)[0]
        print("RESULT " + json.dumps({
            "architectures": llm.llm_engine.model_config.hf_config.architectures,
            "prompt_ids": list(runs[0].prompt_token_ids),
            "runs": [list(r.outputs[0].token_ids) for r in runs],
            "chat_prompt_ids": list(chat.prompt_token_ids),
            "chat_ids": list(chat.outputs[0].token_ids),
        }))
    """
)


def _cpu_bind() -> str:
    """Pin two cores, as every benchmark run does (vLLM otherwise reserves one)."""
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:2])


def test_vllm_loads_tiny_and_decodes_deterministically(tmp_path):
    path = ensure_model("tiny", tmp_path / "models")
    prompt = " ".join(corpus(seed=99, sentences=40))[:1200]  # several 32-token blocks
    script = tmp_path / "run_vllm.py"
    script.write_text(SCRIPT)
    env = os.environ | {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", _cpu_bind()),
    }
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script), str(path), prompt],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    elapsed = time.monotonic() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert result["architectures"] == ["LlamaForCausalLM"]
    assert result["prompt_ids"] == tokenizer.encode(prompt).ids  # BOS first, same tokenizer
    assert len(result["prompt_ids"]) > 96
    first, second = result["runs"]
    assert len(first) == 16 and first == second  # the second run reuses the prefix cache
    assert all(0 <= t < 2048 for t in first)
    # The chat template rendered into Llama 3 headers: BOS, start/end header, eot.
    chat_prompt = result["chat_prompt_ids"]
    assert chat_prompt[0] == 0 and chat_prompt.count(2) == 2 and chat_prompt.count(4) == 1
    assert len(result["chat_ids"]) == 16
    print(f"vLLM e2e wall time: {elapsed:.1f} s")
