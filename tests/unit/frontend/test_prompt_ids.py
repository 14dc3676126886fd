"""The kv router's prompt token ids follow vLLM 0.32's OpenAI rendering rules (the fuzzed
comparison with a worker's own `/tokenize` is in tests/e2e/test_fleet_stack.py): content
formats, tool calls and tools as vLLM serialises them, the template kwargs it passes, the
special-token defaults of chat and completions, truncation, and what it refuses to guess."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dynkv.frontend.prompt_ids import (
    PromptTokenizer,
    Unsupported,
    content_format,
    conversation_of,
    template_kwargs,
    tool_dicts,
)
from dynkv.model.tokenizer import CHAT_TEMPLATE

OPENAI_STYLE = (
    "{% for message in messages %}{{ message['role'] }}:"
    "{% for part in message['content'] %}[{{ part['text'] }}]{% endfor %}\n{% endfor %}"
)
TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %} CALL {{ c.function.name }}"
    "({{ c.function.arguments | tojson }}){% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}{% if flavour %} {{ flavour }}{% endif %}"
)


def test_content_format_is_detected_from_the_template():
    assert content_format(CHAT_TEMPLATE) == "string"
    assert content_format(OPENAI_STYLE) == "openai"
    assert content_format("{% for c in message.content %}{% endfor %}") == "openai"


def test_text_parts_are_joined_or_kept_as_the_template_reads_them():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"], "name": "n"}]
    assert conversation_of(msgs, "string") == [{"role": "user", "content": "a\nb", "name": "n"}]
    assert conversation_of(msgs, "openai")[0]["content"] == [
        {"type": "text", "text": "a"},
        {"type": "text", "text": "b"},
    ]
    with pytest.raises(Unsupported):
        conversation_of([{"role": "user", "content": [{"type": "image_url"}]}], "string")


def test_tool_calls_get_object_arguments_and_tool_results_plain_text():
    calls = [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "2", "type": "function", "function": {"name": "g", "arguments": "not json"}},
        {"id": "3", "type": "function", "function": {"name": "h", "arguments": "[1]"}},
        {"id": "4", "type": "function", "function": {"name": "k", "arguments": ""}},
    ]
    msgs = [
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "1", "content": [{"type": "text", "text": "r"}]},
    ]
    conv = conversation_of(msgs, "openai")
    assert [c["function"]["arguments"] for c in conv[0]["tool_calls"]] == [{"x": 1}, {}, {}, {}]
    assert conv[0]["content"] == []
    assert conv[1] == {"role": "tool", "content": "r", "tool_call_id": "1"}
    assert calls[0]["function"]["arguments"] == '{"x": 1}'  # the request is not modified


@pytest.mark.parametrize(
    ("render", "refused"),
    [
        (lambda: conversation_of(["hi"], "string"), "a message without a role"),
        (
            lambda: conversation_of([{"role": 1, "content": "x"}], "string"),
            "a message without a role",
        ),
        (lambda: tool_dicts({"tools": [{"type": "function"}]}), "a tool without a function"),
        (lambda: tool_dicts({"tools": [{"function": "f"}]}), "a tool without a function"),
        (
            lambda: conversation_of([{"role": "assistant", "tool_calls": [{"id": "1"}]}], "string"),
            "a tool call without a function",
        ),
    ],
)
def test_a_message_tool_or_call_of_the_wrong_shape_is_refused_not_guessed(render, refused):
    with pytest.raises(Unsupported, match=refused):
        render()


def test_tools_are_serialised_as_vllm_does():
    body = {
        "tools": [
            {"type": "function", "function": {"name": "f"}, "defer_loading": True},
            {"type": "function", "function": {"name": "g", "strict": True, "extra": 1}},
        ]
    }
    assert tool_dicts(body) == [
        {
            "type": "function",
            "function": {
                "name": "f",
                "description": None,
                "parameters": None,
                "defer_loading": True,
            },
            "defer_loading": True,
        },
        {
            "type": "function",
            "function": {"name": "g", "description": None, "parameters": None, "strict": True},
        },
    ]
    assert tool_dicts({}) is None


def test_template_kwargs_are_those_the_template_reads_or_transformers_knows():
    body = {
        "chat_template_kwargs": {"flavour": "x", "unused": 1, "add_generation_prompt": False},
        "reasoning_effort": "low",
    }
    kwargs = template_kwargs(body, TOOLS_TEMPLATE)
    # the request's own field wins over chat_template_kwargs, as in vLLM
    assert kwargs == {
        "flavour": "x",
        "add_generation_prompt": True,
        "continue_final_message": False,
    }
    with pytest.raises(Unsupported):
        template_kwargs({"chat_template_kwargs": {"tokenize": True}}, TOOLS_TEMPLATE)


def test_chat_ids_follow_the_template_and_special_token_defaults(tiny):
    tok = PromptTokenizer(tiny)
    hf = AutoTokenizer.from_pretrained(tiny)
    messages = [{"role": "system", "content": " be brief "}, {"role": "user", "content": "hi"}]
    expected = hf.encode(
        hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    assert tok.token_ids("chat", {"messages": messages}) == expected
    assert expected[0] == hf.bos_token_id and expected.count(hf.bos_token_id) == 1
    no_prompt = tok.token_ids("chat", {"messages": messages, "add_generation_prompt": False})
    assert expected[: len(no_prompt)] == no_prompt and len(no_prompt) < len(expected)
    doubled = tok.token_ids("chat", {"messages": messages, "add_special_tokens": True})
    assert doubled[:2] == [hf.bos_token_id, hf.bos_token_id]  # as vLLM would: the user asked


def test_a_tools_template_sees_tools_calls_and_kwargs(tiny, tmp_path):
    tok = PromptTokenizer(tiny, chat_template=TOOLS_TEMPLATE)
    body = {
        "messages": [
            {"role": "user", "content": "w?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "chat_template_kwargs": {"flavour": "sweet"},
    }
    hf = AutoTokenizer.from_pretrained(tiny)
    text = hf.decode(tok.token_ids("chat", body))
    assert text.startswith('TOOLS [{"type": "function", "function": {"name": "f", "description"')
    assert "CALL f({})" in text and text.endswith("assistant: sweet")
    path = tmp_path / "t.jinja"
    path.write_text(TOOLS_TEMPLATE)
    assert PromptTokenizer(tiny, chat_template=str(path)).token_ids("chat", body) == (
        tok.token_ids("chat", body)
    )


def test_completion_ids(tiny):
    tok = PromptTokenizer(tiny)
    hf = AutoTokenizer.from_pretrained(tiny)
    assert tok.token_ids("completions", {"prompt": "a b"}) == hf.encode("a b")
    assert tok.token_ids("completions", {"prompt": ["a b"], "add_special_tokens": False}) == (
        hf.encode("a b", add_special_tokens=False)
    )
    assert tok.token_ids("completions", {"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert tok.token_ids("completions", {"prompt": [5, 6, 7], "truncate_prompt_tokens": 2}) == [
        6,
        7,
    ]
    for prompt in (["a", "b"], [[1], [2]], 5, [], [True]):
        with pytest.raises(Unsupported):
            tok.token_ids("completions", {"prompt": prompt})


def test_a_tokenizer_that_cannot_load_is_not_tried_again_on_every_request(tmp_path, monkeypatch):
    """Each kv request would otherwise pay a load attempt (seconds) before routing by load."""
    import transformers

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError("no tokenizer files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    tok = PromptTokenizer(str(tmp_path))
    for _ in range(3):
        with pytest.raises(OSError, match="no tokenizer files"):
            tok.token_ids("completions", {"prompt": "hi"})
    assert len(calls) == 1
    monkeypatch.setattr(PromptTokenizer, "RETRY_SECS", 0.0)  # after the pause: tried again
    with pytest.raises(OSError):
        tok.token_ids("completions", {"prompt": "hi"})
    assert len(calls) == 2
