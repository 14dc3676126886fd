"""Piecewise encoding gives the tokenizer's own ids: fuzzed text around added tokens (the
whitespace next to them is where a piece's ids could depend on its neighbours), with and
without special tokens, cached and not; and tokenizers whose pieces depend on their place are
refused, so they keep encoding the whole text."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dynkv.frontend.piece_cache import (
    MIN_CACHED_CHARS,
    NotCached,
    PieceEncoder,
    piecewise_safe,
    single_specials,
)
from dynkv.frontend.prompt_ids import PromptTokenizer

WORDS = ["hello", "world", "naïve", "日本語", "1234567", "don't", "x=y+1", "🙂", "\t", "  ", "\n\n"]


@pytest.fixture(scope="module")
def hf(tiny):
    return AutoTokenizer.from_pretrained(tiny, local_files_only=True)


def fuzzed_text(rng: random.Random, specials: list[str]) -> str:
    parts = []
    for _ in range(rng.randint(1, 12)):
        if rng.random() < 0.35:
            parts.append(rng.choice(specials))
        else:
            n = rng.choice([rng.randint(0, 8), rng.randint(60, 200)])  # short and cached pieces
            words = [rng.choice(WORDS) for _ in range(n)]
            parts.append(
                rng.choice(["", " ", "\n"]) + " ".join(words) + rng.choice(["", " ", "\n", "  "])
            )
    return "".join(parts)


def test_piecewise_ids_equal_the_tokenizers_on_fuzzed_text(hf):
    pieces = PieceEncoder.of(hf)
    assert pieces is not None and pieces.specials is not None
    specials = list(hf.get_added_vocab())
    rng = random.Random(7)
    texts = [fuzzed_text(rng, specials) for _ in range(300)]
    for _ in range(2):  # the second pass reads the long pieces from the cache
        for text in texts:
            assert pieces.encode(text) == hf.encode(text, add_special_tokens=False), text
            assert pieces.encode(text, True) == hf.encode(text, add_special_tokens=True), text
    assert pieces.hits > 0 and pieces.misses > 0


def test_a_chat_prompt_is_encoded_once_per_new_piece(tiny):
    tok = PromptTokenizer(tiny)
    system = "You are a careful assistant. " * 40
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]}
    first = tok.token_ids("chat", body)
    assert tok.pieces is not None and tok.pieces.misses == 1
    body["messages"] += [
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "more"},
    ]
    second = tok.token_ids("chat", body)
    assert tok.pieces.hits == 1 and tok.pieces.misses == 1
    whole = tok.tokenizer.apply_chat_template(
        body["messages"], tokenize=False, add_generation_prompt=True
    )
    assert second == tok.tokenizer.encode(whole, add_special_tokens=False)
    assert second[: len(first) - 8] == first[: len(first) - 8]


def test_a_fresh_budget_encodes_only_what_is_mostly_cached(hf):
    """With `fresh_budget` the encoder refuses, touching nothing, a text with more characters
    to encode than allowed (an unseen long piece, or short pieces, which are never cached), and
    gives the tokenizer's own ids for one it has mostly seen."""
    pieces = PieceEncoder.of(hf)
    assert pieces is not None
    eot = next(iter(hf.get_added_vocab()))
    long = "a long system prompt, seen in every round " * 20
    text = long + eot + "short question"
    with pytest.raises(NotCached):
        pieces.encode(text, fresh_budget=len(long) - 1)
    assert (pieces.hits, pieces.misses, pieces.cached_chars) == (0, 0, 0)
    assert pieces.encode(text, fresh_budget=len(long) + 20) == hf.encode(
        text, add_special_tokens=False
    )
    assert pieces.misses == 1  # within the budget it encodes and remembers as usual
    again = long + eot + "another question"
    assert pieces.encode(again, True, fresh_budget=20) == hf.encode(again, add_special_tokens=True)
    with pytest.raises(NotCached):
        pieces.encode(again, fresh_budget=len("another question") - 1)


def test_the_cache_keeps_to_its_bound(hf):
    pieces = PieceEncoder.of(hf, max_chars=3 * MIN_CACHED_CHARS)
    assert pieces is not None
    for i in range(10):
        pieces.encode(f"{i} " + "word " * MIN_CACHED_CHARS)
    assert pieces.cached_chars <= 3 * MIN_CACHED_CHARS
    assert pieces.encode("word " * 2000) == hf.encode("word " * 2000, add_special_tokens=False)


def _edited(hf, edit) -> PreTrainedTokenizerFast:
    spec = json.loads(hf.backend_tokenizer.to_str())
    edit(spec)
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))


def _prefix_space(spec):
    spec["pre_tokenizer"]["add_prefix_space"] = True


def _rstrip(spec):
    spec["added_tokens"][0]["rstrip"] = True


def _normalizer(spec):
    spec["normalizer"] = {"type": "NFKC"}


@pytest.mark.parametrize("edit", [_prefix_space, _rstrip, _normalizer])
def test_tokenizers_whose_pieces_depend_on_their_place_are_refused(hf, edit):
    assert PieceEncoder.of(_edited(hf, edit)) is None


def test_a_post_processor_it_does_not_read_leaves_specials_to_the_tokenizer(hf):
    spec = json.loads(hf.backend_tokenizer.to_str())
    spec["post_processor"] = {"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0]}
    assert piecewise_safe(spec) and single_specials(spec) is None
    pieces = PieceEncoder(hf.backend_tokenizer, {"<|eot_id|>": 1}, 1000, specials=None)
    assert pieces.encode("text", add_special_tokens=True) is None
    assert pieces.encode("text") == hf.encode("text", add_special_tokens=False)


def test_a_description_it_cannot_read_means_whole_texts():
    class Odd:
        class backend_tokenizer:  # noqa: N801 - stands in for the attribute
            @staticmethod
            def to_str():
                return json.dumps({"normalizer": None, "model": {"type": "BPE"},
                                   "pre_tokenizer": {"type": "ByteLevel"}, "added_tokens": [{}]})  # fmt: skip

    assert PieceEncoder.of(Odd()) is None


def test_a_fresh_budget_never_loads_the_tokenizer(tiny):
    """The event loop asks with a budget: a tokenizer not loaded yet (seconds) is the thread's
    job, so the call refuses at once and leaves it unloaded."""
    tok = PromptTokenizer(tiny)
    with pytest.raises(NotCached):
        tok.token_ids("completions", {"prompt": "hi"}, fresh_budget=10**9)
    assert tok._tok is None
    tok.token_ids("completions", {"prompt": "hi"})
    assert tok.token_ids("completions", {"prompt": "hi"}, fresh_budget=10) == tok.token_ids(
        "completions", {"prompt": "hi"}
    )
