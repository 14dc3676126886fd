"""A request's prompt token ids, computed the way the worker's vLLM will compute them.

The kv router hashes the prompt's blocks, so its token ids must equal the engine's to the last
one: one token of difference and every block key after it differs (a miss, never a wrong
answer, but the router would be blind). What vLLM's OpenAI server does (vLLM 0.32,
`renderers/chat_utils.py`, `renderers/hf.py`, `chat_completion/protocol.py`), rebuilt here on
the model's own tokenizer and chat template (transformers), without importing vLLM:

- chat: each message becomes a conversation message; text content parts are joined with "\\n"
  when the template reads `content` as a string, kept as `{"type": "text", ...}` parts when it
  iterates over them ("openai" content format, detected from the template's syntax tree);
  assistant `tool_calls` get their JSON `arguments` parsed into objects; `name`,
  `tool_call_id` and `reasoning` are kept. Tools are passed as vLLM serialises them. The
  template gets `add_generation_prompt` (default true), `continue_final_message`, `documents`,
  `reasoning_effort` and the request's `chat_template_kwargs` (those the template reads, or that
  transformers knows); the text is then encoded with `add_special_tokens` (default false).
- completions: a string prompt is encoded with `add_special_tokens` (default true); a prompt of
  token ids is used as given.
- `truncate_prompt_tokens` keeps that many tokens from `truncation_side` (default left).

What this does not rebuild raises `Unsupported` (images and other non-text parts, several
prompts in one request, prompt embeddings, Mistral tokenizers): the frontend then routes that
request by load (docs/frontend.md#routing). A test compares the result with the worker's own
`/tokenize` on fuzzed chats (tests/e2e/test_fleet_stack.py).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

from dynkv.frontend.piece_cache import NotCached, PieceEncoder

CHAT_DEFAULTS = {"add_generation_prompt": True, "continue_final_message": False}
# apply_chat_template's own parameters a request may set through chat_template_kwargs
_TEMPLATE_PARAMS = frozenset(
    {"add_generation_prompt", "continue_final_message", "documents", "tools"}
)
_REFUSED_KWARGS = frozenset({"chat_template", "tokenize"})  # vLLM answers 400 for these
_CLAUDE_CODE_BILLING = "x-anthropic-billing-header:"


class Unsupported(Exception):
    """A request whose token ids this module does not reproduce (routed by load instead)."""


class PromptTokenizer:
    """The workers' tokenizer, loaded once (lazily, in the caller's thread). The frontend calls
    it from its tokenizer thread, and with `fresh_budget` from its event loop: transformers'
    fast tokenizers and jinja templates encode and render from several threads, and the piece
    cache is locked."""

    # a tokenizer that failed to load is not tried again for this long: every kv request would
    # otherwise pay a load attempt (seconds) before falling back to routing by load
    RETRY_SECS = 60.0

    def __init__(self, source: str, chat_template: str | None = None) -> None:
        self.source = source
        self.chat_template_arg = chat_template
        self._tok: Any = None
        self._failed: tuple[float, Exception] | None = None  # (when, why) of the last failure
        self.pieces: PieceEncoder | None = None  # set with the tokenizer, where it is safe
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        with self._lock:
            if self._tok is None:
                if (
                    self._failed is not None
                    and time.monotonic() - self._failed[0] < self.RETRY_SECS
                ):
                    raise self._failed[1]
                from transformers import AutoTokenizer

                try:
                    tok = AutoTokenizer.from_pretrained(self.source, local_files_only=True)
                except Exception as exc:
                    self._failed = (time.monotonic(), exc)
                    raise
                self.pieces = PieceEncoder.of(tok)
                self._tok = tok
            return self._tok

    def token_ids(
        self, endpoint: str, body: Mapping[str, Any], fresh_budget: int | None = None
    ) -> list[int]:
        """The request's prompt ids. With `fresh_budget`: NotCached unless the tokenizer is
        loaded and at most that many characters need encoding (the rest is in the piece
        cache), so the caller can afford to compute them where it is (docs/frontend.md#routing)."""
        if fresh_budget is not None and (self._tok is None or self.pieces is None):
            raise NotCached("the tokenizer is not loaded, or has no piece cache")
        if endpoint == "chat":
            ids = self.chat_ids(body, fresh_budget)
        else:
            ids = self.completion_ids(body, fresh_budget)
        return _truncated(ids, body)

    # ---- completions ---------------------------------------------------------------------------
    def completion_ids(self, body: Mapping[str, Any], fresh_budget: int | None = None) -> list[int]:
        if body.get("prompt_embeds") is not None:
            raise Unsupported("prompt_embeds")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return self.encode(prompt, bool(body.get("add_special_tokens", True)), fresh_budget)
        if isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
            return list(prompt)
        raise Unsupported("a prompt that is not one string or one list of token ids")

    # ---- chat ----------------------------------------------------------------------------------
    def chat_ids(self, body: Mapping[str, Any], fresh_budget: int | None = None) -> list[int]:
        tok = self.tokenizer
        if type(tok).__name__.startswith("Mistral"):
            raise Unsupported("Mistral tokenizer")
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise Unsupported("messages is not a list")
        tools = tool_dicts(body)
        template = body.get("chat_template") or self.chat_template_arg
        template = self.resolve_template(template, tools)
        conversation = conversation_of(messages, content_format(template))
        if any(m["role"] == "developer" for m in conversation) and not (
            '"developer"' in template or "'developer'" in template
        ):
            raise Unsupported("developer messages with a template that lacks the role")
        kwargs = template_kwargs(body, template)
        text = tok.apply_chat_template(
            conversation=conversation,
            tools=tools,
            chat_template=template,
            tokenize=False,
            **kwargs,
        )
        return self.encode(text, bool(body.get("add_special_tokens", False)), fresh_budget)

    def encode(
        self, text: str, add_special_tokens: bool, fresh_budget: int | None = None
    ) -> list[int]:
        """The text's ids as the tokenizer gives them, pieces seen before taken from the cache
        (dynkv/frontend/piece_cache.py); `fresh_budget` as in `token_ids`."""
        tok = self.tokenizer
        if self.pieces is not None:
            ids = self.pieces.encode(text, add_special_tokens, fresh_budget)
            if ids is not None:
                return ids
        if fresh_budget is not None:
            raise NotCached("specials the piece cache does not know")
        return list(tok.encode(text, add_special_tokens=add_special_tokens))

    def resolve_template(self, template: str | None, tools: list | None) -> str:
        """The template text: the request's or the workers' (a file path or the text itself),
        else the tokenizer's (its `tool_use` variant when the request has tools)."""
        if template:
            return _template_text(template)
        own = self.tokenizer.chat_template
        if isinstance(own, dict):
            if tools and "tool_use" in own:
                return own["tool_use"]
            if "default" in own:
                return own["default"]
            raise Unsupported("no default chat template among the tokenizer's templates")
        if not own:
            raise Unsupported("the tokenizer has no chat template")
        return own


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _template_text(template: str) -> str:
    if any(c in template for c in "{}\n"):
        return template
    try:
        with open(template, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return template  # vLLM treats a string that is no file as the template itself


def _truncated(ids: list[int], body: Mapping[str, Any]) -> list[int]:
    keep = body.get("truncate_prompt_tokens")
    if keep is None:
        return ids
    if not isinstance(keep, int) or keep < 0:
        raise Unsupported("truncate_prompt_tokens other than a count")
    if len(ids) <= keep:
        return ids
    if body.get("truncation_side") == "right":
        return ids[:keep]
    return ids[len(ids) - keep :] if keep else []


def tool_dicts(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The request's tools as vLLM hands them to the template: None without tools (or with
    `tool_choice: "none"`, which vLLM's default keeps, so: kept), each tool `{"type", "function":
    {"name", "description", "parameters"[, "strict"][, "defer_loading"]}[, "defer_loading"]}`."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise Unsupported("tools is not a list")
    out = []
    for tool in _objects_with(tools, "function", dict, "a tool without a function"):
        fn = tool["function"]
        defer = tool.get("defer_loading")
        fn_defer = fn.get("defer_loading")
        if defer is not None and fn_defer is None:
            fn_defer = defer
        function: dict[str, Any] = {
            "name": fn.get("name"),
            "description": fn.get("description"),
            "parameters": fn.get("parameters"),
        }
        if fn.get("strict") is not None:
            function["strict"] = fn["strict"]
        if fn_defer is not None:
            function["defer_loading"] = fn_defer
        entry: dict[str, Any] = {"type": tool.get("type", "function"), "function": function}
        if defer is not None:
            entry["defer_loading"] = defer
        out.append(entry)
    return out


@lru_cache(maxsize=32)
def content_format(template: str) -> str:
    """ "openai" when the template loops over a message's `content` (it wants parts), else
    "string" (vLLM's detection, simplified: a loop whose iterable is `<x>.content`,
    `<x>['content']` or a variable named `content`)."""
    import jinja2
    import jinja2.nodes as n
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        env = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
        env.add_extension("jinja2.ext.do")
        ast = env.parse(template.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    except jinja2.TemplateError:
        return "string"
    for loop in ast.find_all(n.For):
        it = loop.iter
        if isinstance(it, n.Filter) and it.node is not None:
            it = it.node
        if isinstance(it, n.Getattr) and it.attr == "content":
            return "openai"
        if isinstance(it, n.Getitem) and isinstance(it.arg, n.Const) and it.arg.value == "content":
            return "openai"
        if isinstance(it, n.Name) and it.name == "content":
            return "openai"
    return "string"


def conversation_of(messages: list[Any], fmt: str) -> list[dict[str, Any]]:
    out = []
    for message in _objects_with(messages, "role", str, "a message without a role"):
        role = message["role"]
        content = message.get("content")
        if content is None:
            parts: list[Any] = []
        elif isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = content
        else:
            raise Unsupported("message content is neither text nor a list of parts")
        if role == "system":
            parts = _strip_billing_header(parts)
        texts = [_part_text(p) for p in parts]
        msg: dict[str, Any] = {"role": role}
        if fmt == "openai":
            msg["content"] = [{"type": "text", "text": t} for t in texts]
        else:
            msg["content"] = "\n".join(texts)
        if role == "assistant":
            calls = message.get("tool_calls")
            if calls is not None:
                msg["tool_calls"] = _tool_calls(calls)
            if message.get("reasoning") is not None:
                msg["reasoning"] = msg["reasoning_content"] = message["reasoning"]
        elif role == "tool":
            if "tool_call_id" in message:
                msg["tool_call_id"] = message["tool_call_id"]
            if isinstance(msg["content"], list):
                msg["content"] = "\n".join(texts) if texts else ""
        if isinstance(message.get("name"), str):
            msg["name"] = message["name"]
        if isinstance(message.get("task"), str):
            msg["task"] = message["task"]
        if role == "developer":
            msg["tools"] = message.get("tools")
        out.append(msg)
    return out


def _part_text(part: Any) -> str:
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    raise Unsupported("a content part that is not text")


def _strip_billing_header(parts: list[Any]) -> list[Any]:
    out = []
    for part in parts:
        text = (
            part
            if isinstance(part, str)
            else (
                part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            )
        )
        if not (isinstance(text, str) and text.startswith(_CLAUDE_CODE_BILLING)):
            out.append(part)
            continue
        rest = text.partition("\n")[2]
        if rest:
            out.append(rest)
    return out


def _objects_with(items: list[Any], key: str, kind: type, what: str) -> Iterator[dict[str, Any]]:
    """`items`, each checked to be a JSON object whose `key` holds a `kind` (a tool's or a tool
    call's function, a message's role); anything else is `what` the template cannot render."""
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get(key), kind):
            raise Unsupported(what)
        yield item


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise Unsupported("tool_calls is not a list")
    out = []
    for call in _objects_with(
        copy.deepcopy(calls), "function", dict, "a tool call without a function"
    ):
        fn = call["function"]
        args = fn.get("arguments")
        if not args:
            fn["arguments"] = {}
        elif isinstance(args, str):
            try:
                parsed = json.loads(args)
            except json.JSONDecodeError:
                parsed = {}
            fn["arguments"] = parsed if isinstance(parsed, dict) else {}
        elif not isinstance(args, dict):
            fn["arguments"] = {}
        out.append(call)
    return out


def template_kwargs(body: Mapping[str, Any], template: str) -> dict[str, Any]:
    """What vLLM passes to apply_chat_template besides conversation, tools and template."""
    user = body.get("chat_template_kwargs") or {}
    if not isinstance(user, dict):
        raise Unsupported("chat_template_kwargs is not an object")
    if _REFUSED_KWARGS & user.keys():
        raise Unsupported("chat_template_kwargs the worker refuses")
    extra = {
        "add_generation_prompt": body.get("add_generation_prompt", True),
        "continue_final_message": body.get("continue_final_message", False),
        "documents": body.get("documents"),
        "reasoning_effort": body.get("reasoning_effort"),
    }
    if body.get("reasoning_effort") is not None and "enable_thinking" not in user:
        extra["enable_thinking"] = body["reasoning_effort"] != "none"
    merged = {**user, **{k: v for k, v in extra.items() if v is not None and v != "auto"}}
    accepted = _template_variables(template) | _TEMPLATE_PARAMS
    return {k: v for k, v in merged.items() if k in accepted}


@lru_cache(maxsize=32)
def _template_variables(template: str) -> frozenset[str]:
    import jinja2
    from jinja2 import meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        env = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
        ast = env.parse(template.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    except jinja2.TemplateError:
        return frozenset()
    return frozenset(meta.find_undeclared_variables(ast))
