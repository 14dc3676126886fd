"""Fuzzed OpenAI requests for comparing the frontend's prompt token ids with vLLM's own
(tests/unit/frontend/test_prompt_ids.py, tests/e2e/test_fleet_stack.py): chats with system
prompts, multi-part text, tools and tool calls, unicode and whitespace, and the flags that
change rendering. Only fields vLLM's `/tokenize` also accepts."""

from __future__ import annotations

import json
import random
from typing import Any

WORDS = (
    "river", "mountain", "the", "of", "cache", "block", "  spaced  ", "\n", "tabs\t", "émigré",
    "日本語", "🙂", "<|eot_id|>", "{{ not a template }}", "'quoted'", '"double"', "x" * 40,
)  # fmt: skip


def text(rng: random.Random, lo: int = 0, hi: int = 30) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def content(rng: random.Random) -> Any:
    if rng.random() < 0.3:
        return [{"type": "text", "text": text(rng, 1)} for _ in range(rng.randint(1, 3))]
    return text(rng)


TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather at a place.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def fuzzed_chat(rng: random.Random) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if rng.random() < 0.7:
        messages.append({"role": "system", "content": content(rng)})
    for _ in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": content(rng)})
        if rng.random() < 0.2:
            call = {
                "id": f"call_{rng.randint(0, 999)}",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": json.dumps({"city": text(rng, 1, 2)}),
                },
            }
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": content(rng)})
        if rng.random() < 0.7:
            messages.append({"role": "assistant", "content": content(rng)})
    body: dict[str, Any] = {"messages": messages}
    if rng.random() < 0.3:
        body["tools"] = [TOOL]
    if rng.random() < 0.3:
        body["add_generation_prompt"] = rng.random() < 0.5
    if rng.random() < 0.2:
        body["add_special_tokens"] = True
    if rng.random() < 0.2:
        body["chat_template_kwargs"] = {"enable_thinking": rng.random() < 0.5}
    if messages[-1]["role"] == "assistant" and rng.random() < 0.2:
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    return body


def fuzzed_completion(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": text(rng, 1)}
    if rng.random() < 0.5:
        body["add_special_tokens"] = rng.random() < 0.5
    return body
