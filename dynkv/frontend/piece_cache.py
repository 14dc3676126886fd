"""A prompt's token ids, encoded piece by piece between added tokens, long pieces remembered.

The kv router tokenizes every request's whole prompt before it can choose a worker, and on a
small machine the frontend shares its cores with the workers: a 2,000-token chat prompt took
10-25 ms to encode there (3 ms on an idle core), on every request. Most of a chat prompt was
seen before: a conversation's system prompt and earlier turns come back in each round, and many
users send one long shared system prompt.

A fast (Rust) tokenizer first cuts the text at its added tokens (`<|eot_id|>`, the role headers:
everything a chat template puts between messages), then normalizes, pre-tokenizes and encodes
each piece between them on its own. So when the tokenizer's steps are the same for a piece
wherever it sits in the text, the prompt's ids are the concatenation of its pieces' ids, and a
piece met before need not be encoded again. `PieceEncoder.of` returns an encoder only for
tokenizers where that holds and can be read from the tokenizer's own description: no
normalizer; a byte-level BPE whose pre-tokenizer adds no prefix space (one added only at the
start of the text would make a piece's ids depend on its place); added tokens that strip no
whitespace beside them and match anywhere (`lstrip`, `rstrip`, `single_word` all false). Other
tokenizers encode the whole text every time, as before. A test compares both ways on fuzzed
text (tests/unit/frontend/test_piece_cache.py).

`encode(..., fresh_budget=n)` encodes only when at most `n` characters need the tokenizer (the
rest comes from the cache) and raises `NotCached` otherwise: the frontend's event loop
tokenizes a prompt it has mostly seen itself, and hands the others to its tokenizer thread
(dynkv/frontend/kv_route.py). The two threads share the cache, so its reads and writes hold a
lock (never held while the tokenizer encodes).
"""

from __future__ import annotations

import json
import re
import threading
from array import array
from collections import OrderedDict
from typing import Any

# Pieces shorter than this are encoded each time: cheap to encode, and they would churn the
# cache (a role name, one short question).
MIN_CACHED_CHARS = 256
# The cache's bound, in characters of remembered text (the ids take about as many bytes again).
DEFAULT_MAX_CHARS = 16 * 1024 * 1024

_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Split", "Digits"}


class NotCached(Exception):
    """More of the text than the caller's `fresh_budget` would have to be encoded."""


class PieceEncoder:
    """Encodes text as its tokenizer does (`add_special_tokens=False`), reusing the ids of
    long pieces it encoded before. Safe to call from several threads (the cache is locked)."""

    def __init__(
        self,
        backend: Any,
        added: dict[str, int],
        max_chars: int,
        specials: tuple[list[int], list[int]] | None = None,
    ) -> None:
        self._backend = backend
        self._added = added
        # the ids `add_special_tokens=True` puts before and after the text; None when the
        # post-processor is one this module does not read
        self.specials = specials
        # leftmost-longest, as the tokenizer matches added tokens
        alternatives = sorted(added, key=len, reverse=True)
        self._split = re.compile("|".join(re.escape(t) for t in alternatives))
        self._cache: OrderedDict[str, array] = OrderedDict()
        self._lock = threading.Lock()
        self.max_chars = max_chars
        self.cached_chars = 0
        self.hits = 0
        self.misses = 0

    @classmethod
    def of(cls, hf_tokenizer: Any, max_chars: int = DEFAULT_MAX_CHARS) -> PieceEncoder | None:
        """An encoder for this transformers tokenizer, or None where piecewise encoding is not
        provably the same as encoding the whole text."""
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None or getattr(hf_tokenizer, "split_special_tokens", False):
            return None
        try:
            spec = json.loads(backend.to_str())
            if not piecewise_safe(spec):
                return None
            added = {t["content"]: t["id"] for t in spec.get("added_tokens") or ()}
            if not added:
                return None
            return cls(backend, added, max_chars, single_specials(spec))
        except Exception:  # a description this module cannot read: encode whole texts
            return None

    def encode(
        self, text: str, add_special_tokens: bool = False, fresh_budget: int | None = None
    ) -> list[int] | None:
        """The text's ids; None when `add_special_tokens` asks for specials this encoder does
        not know (the caller encodes the whole text then). With `fresh_budget`, NotCached when
        more than that many characters are not in the cache (short pieces count too): nothing
        is encoded then, and the cache is left as it was."""
        if not add_special_tokens:
            before, after = [], []
        elif self.specials is None:
            return None
        else:
            before, after = self.specials
        pieces = self._pieces(text)
        if fresh_budget is not None:
            self._check_budget(pieces, fresh_budget)
        out = list(before)
        for piece in pieces:
            if isinstance(piece, int):
                out.append(piece)
            else:
                self._piece(piece, out)
        out.extend(after)
        return out

    def _pieces(self, text: str) -> list[str | int]:
        """The text cut at its added tokens: the text between them, and their ids."""
        out: list[str | int] = []
        pos = 0
        for m in self._split.finditer(text):
            if m.start() > pos:
                out.append(text[pos : m.start()])
            out.append(self._added[m.group()])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def _check_budget(self, pieces: list[str | int], budget: int) -> None:
        fresh = 0
        with self._lock:
            for piece in pieces:
                if isinstance(piece, str) and (
                    len(piece) < MIN_CACHED_CHARS or piece not in self._cache
                ):
                    fresh += len(piece)
                    if fresh > budget:
                        raise NotCached(f"{fresh}+ characters to encode, {budget} allowed")

    def _piece(self, piece: str, out: list[int]) -> None:
        if len(piece) < MIN_CACHED_CHARS:
            out.extend(self._backend.encode(piece, add_special_tokens=False).ids)
            return
        with self._lock:
            ids = self._cache.get(piece)
            if ids is not None:
                self._cache.move_to_end(piece)
                self.hits += 1
        if ids is None:
            ids = array("I", self._backend.encode(piece, add_special_tokens=False).ids)
            self._remember(piece, ids)
        out.extend(ids)

    def _remember(self, piece: str, ids: array) -> None:
        with self._lock:
            self.misses += 1
            if len(piece) > self.max_chars or piece in self._cache:
                return  # too long to keep, or another thread has just kept it
            self._cache[piece] = ids
            self.cached_chars += len(piece)
            while self.cached_chars > self.max_chars:
                old, _ = self._cache.popitem(last=False)
                self.cached_chars -= len(old)


def piecewise_safe(spec: dict[str, Any]) -> bool:
    """Whether a tokenizer.json description encodes each piece between added tokens the same
    wherever the piece sits (see the module's docstring)."""
    if spec.get("normalizer") is not None:
        return False
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout"):
        return False
    pre = spec.get("pre_tokenizer")
    if pre is None:
        return False
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not steps or not any(s.get("type") == "ByteLevel" for s in steps):
        return False
    for step in steps:
        if step.get("type") not in _SAFE_PRE_TOKENIZERS:
            return False
        if step.get("type") == "ByteLevel" and step.get("add_prefix_space"):
            return False
    return all(
        not (t.get("lstrip") or t.get("rstrip") or t.get("single_word"))
        for t in spec.get("added_tokens") or ()
    )


def single_specials(spec: dict[str, Any]) -> tuple[list[int], list[int]] | None:
    """The ids a one-sequence encoding gets before and after its text with
    `add_special_tokens=True`, read from the post-processor (none, a template, or a sequence of
    a template and byte-level offset fixing); None for any other post-processor."""
    post = spec.get("post_processor")
    if post is None:
        return [], []
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    templates = [s for s in steps if s.get("type") == "TemplateProcessing"]
    if len(templates) > 1 or any(
        s.get("type") not in ("TemplateProcessing", "ByteLevel") for s in steps
    ):
        return None
    if not templates:
        return [], []
    template, known = templates[0], templates[0].get("special_tokens") or {}
    before: list[int] = []
    after: list[int] = []
    seen_text = False
    for item in template.get("single") or ():
        if "Sequence" in item:
            if seen_text or item["Sequence"].get("id") != "A":
                return None
            seen_text = True
        elif "SpecialToken" in item:
            entry = known.get(item["SpecialToken"].get("id"))
            if entry is None:
                return None
            (after if seen_text else before).extend(entry.get("ids") or ())
        else:
            return None
    return (before, after) if seen_text else None
