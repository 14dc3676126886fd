"""Prefix-reuse workloads for `dynkv bench serve`: pure functions of their parameters and a seed.

Three shapes of reuse that KV offloading and KV-aware routing exist for:

- **multi-turn** (like LMCache's multi-round QA benchmark): N users share one system prompt (or,
  `per_user_system`, each has a long one of its own, so that only the worker holding a user's
  conversation can serve it from cache); each user holds a conversation of R rounds, and round r
  resends the whole history (system prompt, every earlier question and answer) plus a new
  question. The answers are the server's own, so the runner fills them in as they arrive
  (`RequestSpec.messages(answers)`); everything else is fixed here by the seed.
- **shared-prefix**: many users behind one long common system prompt, each asking R short
  distinct questions (no history). Every worker can hit the prefix once it holds it, so what
  differs is where the load goes: `affinity="prefix"` gives every request one affinity key.
- **long-doc**: D documents of L tokens, each sent `repeats` times in an order that sets how far
  apart two sends of the same document are (the reuse distance, which decides the tier that can
  still hold it): `tile` (every document, then every document again: the whole set must fit),
  `interleave` (documents in pairs, d0 d1 d0 d1 …, then d2 d3 d2 d3 …: two documents must fit) or
  `random` (the tiled sequence in a seeded random order).

**Sizing text without the server's tokenizer.** Prompts are sentences of words drawn from
`WORDS`, very common lowercase English words that a generic byte-level BPE vocabulary (GPT-2,
Llama 3, cl100k and the like) holds as one token each with their leading space; every sentence
ends in a period, one more token. So a piece of `n` tokens is built as words + periods = n, which
lands within a few percent of `n` on such tokenizers. A small or unusual vocabulary splits words
further: pass a token counter (`--tokenizer DIR`, see `tokenizer_counter`) and every piece is cut
to the longest word prefix whose count is ≤ n (exact up to one word). Chat templates add their own
few tokens per message on top.

Everything random comes from `random.Random(<seed>:<purpose>:<index>)` seeded with a string (hashed
with SHA-512 by Python, independent of PYTHONHASHSEED) and only its `random()` method, whose
sequence Python guarantees across versions, so one seed gives the same prompts on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynkv.errors import CauseFix

WORKLOADS = ("multi-turn", "long-doc", "shared-prefix")
AFFINITIES = ("prefix", "user")
REPEAT_MODES = ("tile", "random", "interleave")

# Tokens → count; e.g. a Hugging Face tokenizer's len(encode(text, add_special_tokens=False)).
TokenCounter = Callable[[str], int]

# Frequent English words that generic BPE vocabularies hold as single tokens (with a leading space).
_WORD_TEXT = """
the of and to in is that for it as was with be by on not he this are or his from at which but
have an had they you were their one all we can her has there been if more when will would who
so no time data cache memory about out up them some what into only new other could its two than
first then also after any these may over most made well way use such our year should each much
where through good back people very just world work day long see before between last many those
same part since great under three never while house small found being take life state point
public few end high need both group number case right place system line every water power light
city hand game second home order name early low local market book run form paper field table
model value host disk block token user server client page file plan test note level range stage
node rate size text word list key map set sort tree path link
"""
WORDS = tuple(_WORD_TEXT.split())
LONG_DOC_QUESTION = "what is this document about."  # 6 words + period: 7 tokens by the estimate


class WorkloadError(CauseFix, ValueError):
    """A workload parameter out of range: the cause and how to fix it (the CLI prints both)."""


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload, before the server's answers to earlier rounds are known.

    `round` is 1-based: the conversation round (multi-turn) or the how-many-th send of the same
    document (long-doc). `depends_on` is the index of the request that must finish first: the
    previous round of the same user (its answer is part of this prompt) or the previous send of
    the same document (so that its KV exists to be reused).
    """

    index: int
    session: str
    round: int
    depends_on: int | None
    questions: tuple[str, ...]  # user turns so far, this round's last
    max_tokens: int
    system: str | None = None
    affinity: str | None = None  # the affinity key sent as `x-session-id`; None: `session`

    @property
    def affinity_key(self) -> str:
        return self.affinity or self.session

    def messages(self, answers: Sequence[str] = ()) -> list[dict[str, str]]:
        """Chat messages: system, then (question, answer) of every earlier round, then the question.

        `answers` are the server's answers to the earlier rounds of this session, oldest first.
        """
        if len(answers) < len(self.questions) - 1:
            raise ValueError(
                f"request {self.index} needs {len(self.questions) - 1} earlier answers, "
                f"got {len(answers)}"
            )
        out = [{"role": "system", "content": self.system}] if self.system is not None else []
        for question, answer in zip(self.questions[:-1], answers, strict=False):
            out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append({"role": "user", "content": self.questions[-1]})
        return out

    def prompt(self, answers: Sequence[str] = ()) -> str:
        """The same conversation as one completion prompt; earlier turns are a stable prefix."""
        turns = [f"{m['role']}: {m['content']}" for m in self.messages(answers)]
        return "\n\n".join([*turns, "assistant:"])


@dataclass(frozen=True)
class Workload:
    name: str
    requests: tuple[RequestSpec, ...]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return max((r.round for r in self.requests), default=0)


def _rng(seed: int, purpose: str, index: int = 0) -> random.Random:
    return random.Random(f"{seed}:{purpose}:{index}")


def _sentences(rng: random.Random, tokens: int) -> list[str]:
    """Words and periods adding up to `tokens` by the one-token-per-word estimate."""
    out: list[str] = []
    left = tokens
    while left > 0:
        words = min(left - 1, 6 + int(rng.random() * 10))
        if words <= 0:  # one token left: a word without its period
            out.append(WORDS[int(rng.random() * len(WORDS))])
            break
        out.append(" ".join(WORDS[int(rng.random() * len(WORDS))] for _ in range(words)) + ".")
        left -= words + 1
    return out


def text(rng: random.Random, tokens: int, count: TokenCounter | None = None) -> str:
    """About `tokens` tokens of text; at most `tokens` by `count` when a counter is given."""
    if tokens <= 0:
        return ""
    if count is None:
        return " ".join(_sentences(rng, tokens))
    # Grow a candidate until it holds enough tokens, then keep the longest word prefix that fits.
    words: list[str] = []
    budget = tokens
    while True:
        words += " ".join(_sentences(rng, budget)).split(" ")
        if count(" ".join(words)) >= tokens:
            break
        budget = max(budget // 2, 8)
    lo, hi = 1, len(words)  # invariant: prefix of `lo` fits (checked below), `hi + 1` does not
    if count(words[0]) > tokens:
        return words[0]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(" ".join(words[:mid])) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def _positive(name: str, value: int, flag: str, minimum: int = 1) -> None:
    if value < minimum:
        raise WorkloadError(
            f"{name} must be ≥ {minimum}, got {value}", f"pass {flag} {max(minimum, 1)} or more"
        )


def _checked(**counts: int) -> dict[str, int]:
    """`counts`, each checked ≥ 1 (≥ 0 for `system_tokens`) and named in the error by the flag
    of its name (`doc_tokens` → --doc-tokens): a workload's parameters as its report lists them."""
    for name, value in counts.items():
        minimum = 0 if name == "system_tokens" else 1
        _positive(name.replace("_", " "), value, "--" + name.replace("_", "-"), minimum)
    return counts


def _conversation(
    users: int, rounds: int, system_tokens: int, question_tokens: int, answer_tokens: int
) -> dict[str, int]:
    """What both conversation workloads are shaped by, checked, as their reports list it."""
    return _checked(**locals())  # the five counts above, by their names, in their order


def multi_turn(
    users: int = 4,
    rounds: int = 4,
    system_tokens: int = 512,
    question_tokens: int = 64,
    answer_tokens: int = 32,
    seed: int = 0,
    count: TokenCounter | None = None,
    per_user_system: bool = False,
) -> Workload:
    """Round-major order (every user's round 1, then every user's round 2, …). `per_user_system`:
    each user gets a system prompt of its own (`system_tokens` long) instead of the shared one;
    the report's params then say `per_user_system: true` (absent otherwise, as before)."""
    shape = _conversation(users, rounds, system_tokens, question_tokens, answer_tokens)
    params = shape | {"seed": seed}

    def system(purpose: str, u: int = 0) -> str | None:
        return text(_rng(seed, purpose, u), system_tokens, count) if system_tokens else None

    if per_user_system:
        params["per_user_system"] = True
    systems = [system("user-system", u) for u in range(users)] if per_user_system else None
    systems = systems or [system("system")] * users
    questions = [
        [text(_rng(seed, f"question-{u}", r), question_tokens, count) for r in range(rounds)]
        for u in range(users)
    ]
    requests = []
    for r in range(rounds):
        for u in range(users):
            index = r * users + u
            requests.append(
                RequestSpec(
                    index=index,
                    session=f"user-{u}",
                    round=r + 1,
                    depends_on=index - users if r else None,
                    questions=tuple(questions[u][: r + 1]),
                    max_tokens=answer_tokens,
                    system=systems[u],
                )
            )
    return Workload("multi-turn", tuple(requests), params)


def shared_prefix(
    users: int = 16,
    rounds: int = 2,
    system_tokens: int = 2048,
    question_tokens: int = 32,
    answer_tokens: int = 16,
    affinity: str = "prefix",
    seed: int = 0,
    count: TokenCounter | None = None,
) -> Workload:
    """`users` × `rounds` independent requests, round-major: the common prompt, then the user's
    r-th short question without the earlier ones. `affinity`: the key is `prefix-0` or the user."""
    if affinity not in AFFINITIES:
        fix = f"use --affinity with one of: {', '.join(AFFINITIES)}"
        raise WorkloadError(f"unknown affinity {affinity!r}", fix)
    shape = _conversation(users, rounds, system_tokens, question_tokens, answer_tokens)
    params = shape | {"affinity": affinity, "seed": seed}
    system = text(_rng(seed, "shared-prefix"), system_tokens, count) if system_tokens else None
    requests = []
    for r in range(rounds):
        for u in range(users):
            requests.append(
                RequestSpec(
                    index=r * users + u,
                    session=f"user-{u}",
                    round=r + 1,
                    depends_on=None,
                    questions=(text(_rng(seed, f"short-question-{u}", r), question_tokens, count),),
                    max_tokens=answer_tokens,
                    system=system,
                    affinity="prefix-0" if affinity == "prefix" else None,
                )
            )
    return Workload("shared-prefix", tuple(requests), params)


def _shuffled(items: list[int], rng: random.Random) -> list[int]:
    """Fisher–Yates on `random()` only (`random.shuffle`'s draws are not a documented contract)."""
    items = list(items)
    for i in range(len(items) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        items[i], items[j] = items[j], items[i]
    return items


def doc_order(docs: int, repeats: int, mode: str, seed: int = 0) -> list[int]:
    """The sequence of document indices sent, each `repeats` times, in repeat mode `mode`."""
    tiled = [d for _ in range(repeats) for d in range(docs)]
    if mode == "tile":
        return tiled
    if mode == "random":
        return _shuffled(tiled, _rng(seed, "order"))
    if mode == "interleave":
        pairs = [list(range(d, min(d + 2, docs))) for d in range(0, docs, 2)]
        return [d for pair in pairs for _ in range(repeats) for d in pair]
    raise WorkloadError(
        f"unknown repeat mode {mode!r}", f"use --mode with one of: {', '.join(REPEAT_MODES)}"
    )


def long_doc(
    docs: int = 6,
    doc_tokens: int = 3600,
    repeats: int = 2,
    mode: str = "tile",
    answer_tokens: int = 1,
    seed: int = 0,
    count: TokenCounter | None = None,
) -> Workload:
    """Defaults are workload W1 (docs/benchmarks.md): 6 documents × ~3.6k tokens, each sent twice."""
    params = {
        **_checked(docs=docs, doc_tokens=doc_tokens, repeats=repeats),
        "mode": mode,
        **_checked(answer_tokens=answer_tokens),
        "seed": seed,
    }
    order = doc_order(docs, repeats, mode, seed)
    texts = [text(_rng(seed, "doc", d), doc_tokens, count) for d in range(docs)]
    sent: dict[int, int] = {}
    last: dict[int, int] = {}
    requests = []
    for index, d in enumerate(order):
        sent[d] = sent.get(d, 0) + 1
        requests.append(
            RequestSpec(
                index=index,
                session=f"doc-{d}",
                round=sent[d],
                depends_on=last.get(d),
                questions=(f"{texts[d]}\n\n{LONG_DOC_QUESTION}",),
                max_tokens=answer_tokens,
            )
        )
        last[d] = index
    return Workload("long-doc", tuple(requests), params)


def check_name(name: str) -> None:
    if name not in WORKLOADS:
        raise WorkloadError(
            f"unknown workload {name!r}", f"use --workload with one of: {', '.join(WORKLOADS)}"
        )


def build(
    name: str,
    seed: int = 0,
    count: TokenCounter | None = None,
    **params: int | str | bool | None,
) -> Workload:
    """The workload `name` with `params` (None means the builder's default), as the CLI asks."""
    check_name(name)
    builders = {"multi-turn": multi_turn, "long-doc": long_doc, "shared-prefix": shared_prefix}
    chosen = {key: value for key, value in params.items() if value is not None}
    return builders[name](seed=seed, count=count, **chosen)  # type: ignore[arg-type]


def warmup(n: int, tokens: int = 32, max_tokens: int = 4, seed: int = 0) -> Workload:
    """`n` short independent requests sharing no prefix with the measured ones (not counted)."""
    _positive("warm-up requests", n, "--warmup", 0)
    requests = tuple(
        RequestSpec(
            index=i,
            session=f"warmup-{i}",
            round=1,
            depends_on=None,
            questions=(text(_rng(seed, "warmup", i), tokens),),
            max_tokens=max_tokens,
        )
        for i in range(n)
    )
    return Workload("warmup", requests, {"requests": n})


def tokenizer_counter(directory: str | Path) -> TokenCounter:
    """Exact sizing with the model's own tokenizer (transformers.AutoTokenizer, local files only)."""
    path = Path(directory)
    if not path.is_dir():
        raise WorkloadError(
            f"tokenizer directory {path} does not exist",
            "pass --tokenizer with a local model or tokenizer directory, or leave it out",
        )
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types for an unreadable tokenizer
        raise WorkloadError(
            f"cannot load a tokenizer from {path}: {exc}".splitlines()[0],
            "pass --tokenizer with a directory holding tokenizer.json or tokenizer.model",
        ) from None

    def count(piece: str) -> int:
        return len(tokenizer(piece, add_special_tokens=False)["input_ids"])

    return count
