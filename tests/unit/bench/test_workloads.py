"""Workload generators: pure and deterministic for a seed, sized close to the request, with the
dependencies and orders that make the intended prefixes reusable."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from tokenizers import Tokenizer

from dynkv.bench import workloads as w
from dynkv.model import ensure_model


def estimate(text: str) -> int:
    """The generator's own measure: one token per word, one per sentence-ending period."""
    return len(text.split()) + text.count(".")


@pytest.fixture(scope="module")
def tiny_count(tmp_path_factory):
    path = ensure_model("tiny", tmp_path_factory.mktemp("models"))
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return lambda s: len(tok.encode(s, add_special_tokens=False).ids)


def prompts(work: w.Workload) -> list[str]:
    return [spec.prompt(["ANSWER"] * (spec.round - 1)) for spec in work.requests]


def test_same_seed_same_prompts_other_seed_different():
    a = w.multi_turn(users=3, rounds=3, system_tokens=64, question_tokens=16, seed=7)
    b = w.multi_turn(users=3, rounds=3, system_tokens=64, question_tokens=16, seed=7)
    c = w.multi_turn(users=3, rounds=3, system_tokens=64, question_tokens=16, seed=8)
    assert a == b and prompts(a) == prompts(b)
    assert all(x != y for x, y in zip(prompts(a), prompts(c), strict=True))
    d1 = w.long_doc(docs=3, doc_tokens=200, repeats=2, mode="random", seed=1)
    d2 = w.long_doc(docs=3, doc_tokens=200, repeats=2, mode="random", seed=1)
    d3 = w.long_doc(docs=3, doc_tokens=200, repeats=2, mode="random", seed=2)
    assert d1 == d2
    assert {s.questions for s in d1.requests}.isdisjoint({s.questions for s in d3.requests})


@pytest.mark.parametrize("tokens", [1, 2, 7, 32, 100, 513, 3600])
def test_estimated_size_is_exact_by_its_own_measure(tokens):
    text = w.text(w._rng(0, "t"), tokens)
    assert estimate(text) == tokens
    assert set(re.findall(r"[a-z]+", text)) <= set(w.WORDS)


@pytest.mark.parametrize("tokens", [16, 64, 512, 3600])
def test_sized_with_a_tokenizer_is_at_most_and_close_to_the_request(tiny_count, tokens):
    text = w.text(w._rng(3, "t"), tokens, tiny_count)
    n = tiny_count(text)
    assert tokens - 4 <= n <= tokens  # one word is at most a few tokens of this small vocabulary
    # Without the tokenizer the estimate overshoots this 2,048-token vocabulary, but stays near.
    rough = tiny_count(w.text(w._rng(3, "t"), tokens))
    assert tokens <= rough <= 1.35 * tokens + 4


def test_tokenizer_counter_loads_a_local_model_directory(tmp_path):
    path = ensure_model("tiny", tmp_path)
    count = w.tokenizer_counter(path)
    work = w.long_doc(docs=2, doc_tokens=300, repeats=1, count=count)
    doc = work.requests[0].questions[0].removesuffix(f"\n\n{w.LONG_DOC_QUESTION}")
    assert 296 <= count(doc) <= 300
    with pytest.raises(w.WorkloadError, match="does not exist"):
        w.tokenizer_counter(tmp_path / "nope")


def test_multi_turn_shape_shared_system_growing_history():
    work = w.multi_turn(users=2, rounds=3, system_tokens=40, question_tokens=10, answer_tokens=5)
    assert [(s.session, s.round) for s in work.requests] == [
        ("user-0", 1),
        ("user-1", 1),
        ("user-0", 2),
        ("user-1", 2),
        ("user-0", 3),
        ("user-1", 3),
    ]
    assert [s.depends_on for s in work.requests] == [None, None, 0, 1, 2, 3]
    assert len({s.system for s in work.requests}) == 1 and estimate(work.requests[0].system) == 40
    assert all(s.max_tokens == 5 for s in work.requests)
    third = work.requests[4]
    msgs = third.messages(["a1", "a2"])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in msgs if m["role"] == "assistant"] == ["a1", "a2"]
    # Round r's prompt extends round r-1's prompt plus its answer: a reusable prefix.
    second = work.requests[2]
    assert third.prompt(["a1", "a2"]).startswith(second.prompt(["a1"]).removesuffix("assistant:"))
    assert work.requests[0].questions[0] != work.requests[1].questions[0]
    assert work.rounds == 3
    with pytest.raises(ValueError, match="needs 2 earlier answers"):
        third.messages(["a1"])


def test_doc_orders():
    assert w.doc_order(3, 2, "tile") == [0, 1, 2, 0, 1, 2]
    assert w.doc_order(3, 2, "interleave") == [0, 1, 0, 1, 2, 2]
    assert w.doc_order(4, 3, "interleave") == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3]
    shuffled = w.doc_order(5, 3, "random", seed=4)
    assert Counter(shuffled) == Counter(w.doc_order(5, 3, "tile"))
    assert shuffled != w.doc_order(5, 3, "tile")
    assert shuffled == w.doc_order(5, 3, "random", seed=4) != w.doc_order(5, 3, "random", seed=5)
    with pytest.raises(w.WorkloadError, match="unknown repeat mode"):
        w.doc_order(2, 2, "zigzag")


def test_long_doc_rounds_and_dependencies_follow_the_order():
    work = w.long_doc(docs=2, doc_tokens=64, repeats=3, mode="tile", answer_tokens=1)
    assert [(s.session, s.round, s.depends_on) for s in work.requests] == [
        ("doc-0", 1, None),
        ("doc-1", 1, None),
        ("doc-0", 2, 0),
        ("doc-1", 2, 1),
        ("doc-0", 3, 2),
        ("doc-1", 3, 3),
    ]
    assert work.requests[0].questions == work.requests[2].questions  # identical resend
    assert work.requests[0].questions != work.requests[1].questions
    assert work.requests[0].messages() == [
        {"role": "user", "content": work.requests[0].questions[0]}
    ]
    assert work.params["mode"] == "tile"


def test_build_by_name_uses_defaults_for_none():
    assert w.build("long-doc", seed=2, docs=2, doc_tokens=None, mode=None) == w.long_doc(
        docs=2, seed=2
    )
    assert w.build("multi-turn", users=1, answer_tokens=None) == w.multi_turn(users=1)
    with pytest.raises(w.WorkloadError, match="unknown workload 'chatty'"):
        w.build("chatty")


def test_warmup_shares_no_text_with_the_workload():
    warm = w.warmup(3, seed=0)
    work = w.multi_turn(users=2, rounds=1, system_tokens=32, question_tokens=32, seed=0)
    assert len(warm.requests) == 3 and w.warmup(0).requests == ()
    texts = {s.questions[0] for s in work.requests} | {work.requests[0].system}
    assert texts.isdisjoint(s.questions[0] for s in warm.requests)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: w.multi_turn(users=0), "users must be ≥ 1"),
        (lambda: w.multi_turn(rounds=0), "rounds must be ≥ 1"),
        (lambda: w.multi_turn(system_tokens=-1), "system tokens must be ≥ 0"),
        (lambda: w.long_doc(docs=0), "docs must be ≥ 1"),
        (lambda: w.long_doc(mode="zigzag"), "unknown repeat mode"),
        (lambda: w.long_doc(answer_tokens=0), "answer tokens must be ≥ 1"),
    ],
)
def test_bad_parameters_say_cause_and_fix(build, message):
    with pytest.raises(w.WorkloadError, match=message) as info:
        build()
    assert info.value.fix.startswith(("pass", "use"))
