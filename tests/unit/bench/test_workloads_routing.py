"""The workloads of a router comparison: multi-turn with a long system prompt per user (only the
worker holding a user's conversation can serve it from cache), and shared-prefix (one long common
prompt, short distinct questions, one affinity key that piles a session router's load on one
worker)."""

from __future__ import annotations

import pytest

from dynkv.bench import workloads as w
from dynkv.bench.runner import RunOptions, request_headers


def test_multi_turn_per_user_system_prompts_are_long_distinct_and_stable_per_user():
    work = w.multi_turn(
        users=5, rounds=4, system_tokens=300, question_tokens=8, per_user_system=True
    )
    by_user: dict[str, set[str | None]] = {}
    for spec in work.requests:
        by_user.setdefault(spec.session, set()).add(spec.system)
    assert all(
        len(systems) == 1 for systems in by_user.values()
    )  # one prompt per user, every round
    systems = [next(iter(s)) for s in by_user.values()]
    assert len(set(systems)) == 5  # users > workers, none sharing a prompt
    assert all(s is not None and len(s.split()) + s.count(".") == 300 for s in systems)
    assert work.rounds == 4 and work.params["per_user_system"] is True
    # the shared variant is unchanged, and its params keep their old shape
    shared = w.multi_turn(users=5, rounds=4, system_tokens=300, question_tokens=8)
    assert len({s.system for s in shared.requests}) == 1 and "per_user_system" not in shared.params
    assert [s.questions for s in shared.requests] == [s.questions for s in work.requests]


def test_shared_prefix_shape_one_common_prompt_distinct_short_questions():
    work = w.shared_prefix(users=6, rounds=2, system_tokens=400, question_tokens=12, seed=3)
    assert work.name == "shared-prefix" and len(work.requests) == 12
    assert {s.system for s in work.requests} == {work.requests[0].system}
    assert len(work.requests[0].system.split()) + work.requests[0].system.count(".") == 400
    questions = [s.questions for s in work.requests]
    assert all(len(q) == 1 for q in questions)  # no history: each question stands alone
    assert len(set(questions)) == 12  # distinct
    # round-major, independent, each user's r-th question in round r
    assert [(s.session, s.round) for s in work.requests[:7]] == [
        *((f"user-{u}", 1) for u in range(6)),
        ("user-0", 2),
    ]
    assert all(s.depends_on is None for s in work.requests)
    assert {s.affinity_key for s in work.requests} == {"prefix-0"}
    assert work.params == {
        "users": 6,
        "rounds": 2,
        "system_tokens": 400,
        "question_tokens": 12,
        "answer_tokens": 16,
        "affinity": "prefix",
        "seed": 3,
    }
    assert w.shared_prefix(users=6, rounds=2, system_tokens=400, question_tokens=12, seed=3) == work
    # round 2's prompt carries no earlier answer even when the runner has one for the user
    spec = work.requests[6]
    assert spec.messages(["an answer"]) == [
        {"role": "system", "content": spec.system},
        {"role": "user", "content": spec.questions[0]},
    ]


def test_shared_prefix_user_affinity_and_the_headers_a_run_sends():
    work = w.shared_prefix(users=3, rounds=1, system_tokens=20, affinity="user")
    assert [s.affinity_key for s in work.requests] == ["user-0", "user-1", "user-2"]
    plain = RunOptions(url="http://x", model="m")
    assert request_headers(work.requests[0], plain) is None  # a plain run sends none
    routed = RunOptions(url="http://x", model="m", router="kv", session_header=True)
    assert request_headers(work.requests[1], routed) == {
        "x-dynkv-router": "kv",
        "x-session-id": "user-1",
    }
    pinned = w.shared_prefix(users=2, rounds=1, system_tokens=20).requests[1]
    assert request_headers(pinned, routed)["x-session-id"] == "prefix-0"


def test_shared_prefix_by_name_and_bad_affinity():
    work = w.build("shared-prefix", users=2, rounds=None, affinity=None)
    assert len(work.requests) == 2 * 2 and work.params["system_tokens"] == 2048
    with pytest.raises(w.WorkloadError) as exc:
        w.shared_prefix(affinity="tenant")
    assert "--affinity" in exc.value.fix
    with pytest.raises(w.WorkloadError) as exc:
        w.shared_prefix(users=0)
    assert exc.value.fix == "pass --users 1 or more"
