"""The client and the runner against an in-process fake OpenAI server (httpx.MockTransport):
timings come from chunks as they arrive, dependencies and the concurrency cap hold, answers flow
into the next round, failures are recorded rather than raised."""

from __future__ import annotations

import asyncio
import json
import statistics

import httpx
import pytest

from dynkv.bench import runner, workloads
from dynkv.bench.client import RequestResult, request_body, stream_request

GAP = 0.03  # seconds between the fake server's chunks


class FakeServer:
    """Streams `tokens` chunks per request, GAP apart, as vLLM's OpenAI server does."""

    def __init__(self, tokens: int = 3, fail: set[int] | None = None, usage: bool = True):
        self.tokens, self.fail, self.usage = tokens, fail or set(), usage
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0

    def sse(self, chunk: dict | str) -> bytes:
        data = chunk if isinstance(chunk, str) else json.dumps(chunk)
        return f"data: {data}\n\n".encode()

    async def stream(self, n: int, chat: bool):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if chat:
            yield self.sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for i in range(self.tokens):
            await asyncio.sleep(GAP)
            piece = f"a{n}.{i} "
            choice = {"delta": {"content": piece}} if chat else {"text": piece}
            yield self.sse({"choices": [{"index": 0, **choice}]})
        if self.usage:
            usage = {"prompt_tokens": 10, "completion_tokens": self.tokens}
            yield self.sse({"choices": [], "usage": usage})
        # The client stops reading at [DONE], so the request is over once it is sent.
        self.in_flight -= 1
        yield self.sse("[DONE]")

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        n = len(self.bodies)
        self.bodies.append(body)
        if n in self.fail:
            return httpx.Response(500, json={"message": "boom", "type": "InternalServerError"})
        chat = request.url.path == "/v1/chat/completions"
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=self.stream(n, chat),
        )


def options(**kw) -> runner.RunOptions:
    return runner.RunOptions(url="http://fake:8000", model="m", **kw)


def run(work, server, warm=None, **kw) -> runner.RunResult:
    transport = httpx.MockTransport(server)
    return asyncio.run(runner.run_async(work, options(**kw), warm, transport=transport))


def test_one_streamed_request_times_chunks_as_they_arrive():
    server = FakeServer(tokens=4)

    async def go() -> RequestResult:
        async with httpx.AsyncClient(
            base_url="http://fake", transport=httpx.MockTransport(server)
        ) as client:
            body = request_body("chat", "m", [{"role": "user", "content": "hi"}], 4)
            return await stream_request(client, "chat", body, RequestResult(0, "s", 1), 0.0)

    result = asyncio.run(go())
    assert result.ok and result.error is None
    assert result.output_tokens == 4 and result.prompt_tokens == 10
    assert result.text == "a0.0 a0.1 a0.2 a0.3 "
    assert GAP * 0.8 <= result.ttft < GAP * 10
    assert len(result.itl) == 3 and all(GAP * 0.8 <= g < GAP * 10 for g in result.itl)
    assert result.latency >= result.ttft + sum(result.itl) * 0.99
    body = server.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 4 and body["temperature"] == 0.0 and "ignore_eos" not in body


def test_completions_endpoint_and_token_count_without_usage():
    server = FakeServer(tokens=3, usage=False)
    work = workloads.long_doc(docs=1, doc_tokens=20, repeats=1)
    result = run(work, server, endpoint="completions", ignore_eos=True).results[0]
    assert result.ok and result.output_tokens == 3 and result.prompt_tokens is None
    body = server.bodies[0]
    assert body["prompt"].endswith("assistant:") and body["ignore_eos"] is True


def test_multi_turn_answers_flow_into_the_next_round_after_it_finishes():
    server = FakeServer(tokens=2)
    work = workloads.multi_turn(users=2, rounds=3, system_tokens=8, question_tokens=4)
    result = run(work, server, concurrency=4)
    assert [r.ok for r in result.results] == [True] * 6
    by_user: dict[str, list[dict]] = {}
    for body in server.bodies:
        by_user.setdefault(body["messages"][1]["content"], []).append(body)
    for bodies in by_user.values():
        assert [len(b["messages"]) for b in bodies] == [2, 4, 6]
    # Every round-2+ request carries the answer its user received in the previous round.
    for spec, res in zip(work.requests, result.results, strict=True):
        if spec.depends_on is not None:
            previous = result.results[spec.depends_on]
            assert res.start >= previous.start + previous.latency * 0.99
    last = server.bodies[-1]["messages"]
    answers = [m["content"] for m in last if m["role"] == "assistant"]
    assert len(answers) == 2 and all(a.startswith("a") for a in answers)


def test_concurrency_caps_requests_in_flight():
    server = FakeServer(tokens=2)
    work = workloads.long_doc(docs=6, doc_tokens=8, repeats=1)
    result = run(work, server, concurrency=2)
    assert server.max_in_flight == 2
    assert len(result.results) == 6 and all(r.ok for r in result.results)
    server = FakeServer(tokens=2)
    run(work, server, concurrency=1)
    assert server.max_in_flight == 1


def test_warmup_runs_first_and_is_not_counted():
    server = FakeServer(tokens=1)
    work = workloads.long_doc(docs=2, doc_tokens=8, repeats=1)
    result = run(work, server, warm=workloads.warmup(3), concurrency=2)
    assert len(result.warmup) == 3 and len(result.results) == 2
    assert len(server.bodies) == 5
    warm_texts = {s.questions[0] for s in workloads.warmup(3).requests}
    assert {b["messages"][-1]["content"] for b in server.bodies[:3]} == warm_texts


def test_failures_are_recorded_and_the_run_goes_on():
    server = FakeServer(tokens=2, fail={1})
    work = workloads.long_doc(docs=3, doc_tokens=8, repeats=1)
    results = run(work, server, concurrency=1).results
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error == "HTTP 500: boom" and results[1].ttft is None


def test_unreachable_server_is_an_error_per_request():
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    work = workloads.long_doc(docs=2, doc_tokens=8, repeats=1)
    transport = httpx.MockTransport(refuse)
    result = asyncio.run(runner.run_async(work, options(), transport=transport))
    assert [r.error for r in result.results] == ["ConnectError: connection refused"] * 2


def test_poisson_arrivals_are_seeded_with_the_right_mean():
    a = runner.arrival_times(2000, rate=5.0, seed=1)
    assert a == runner.arrival_times(2000, rate=5.0, seed=1) != runner.arrival_times(2000, 5.0, 2)
    gaps = [y - x for x, y in zip(a, a[1:], strict=False)]
    assert a[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(0.2, rel=0.1)
    assert statistics.stdev(gaps) == pytest.approx(0.2, rel=0.15)  # exponential: sd = mean
    assert runner.arrival_times(3, None) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        runner.arrival_times(3, 0.0)


def test_rate_paces_the_requests():
    server = FakeServer(tokens=1)
    work = workloads.long_doc(docs=4, doc_tokens=8, repeats=1)
    result = run(work, server, rate=20.0, seed=3)
    releases = runner.arrival_times(4, 20.0, 3)
    for res, release in zip(result.results, releases, strict=True):
        assert res.start >= release - 0.005
    assert server.max_in_flight >= 1


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        (b'data: {"error": {"message": "oom"}}\n\n', "stream error: {'message': 'oom'}"),
        (b"data: 123\n\n", "TypeError"),
        (b"data: {not json\n\n", "JSONDecodeError"),
        (b"data: [DONE]\n\n", "the stream ended without any output token"),
    ],
)
def test_bad_streams_are_that_requests_error(lines, error):
    def handler(request):
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=lines)

    work = workloads.long_doc(docs=1, doc_tokens=8, repeats=1)
    transport = httpx.MockTransport(handler)
    (result,) = asyncio.run(runner.run_async(work, options(), transport=transport)).results
    assert not result.ok and result.error.startswith(error)


def test_api_key_is_sent_as_a_bearer_token():
    seen = []

    def handler(request):
        seen.append(request.headers.get("authorization"))
        return httpx.Response(500, json={"message": "no"})

    work = workloads.long_doc(docs=1, doc_tokens=8, repeats=1)
    transport = httpx.MockTransport(handler)
    asyncio.run(runner.run_async(work, options(api_key="s3cret"), transport=transport))
    assert seen == ["Bearer s3cret"]


def test_send_session_puts_each_users_session_in_the_user_field():
    """`--send-session`: the frontend's session router sees one key per simulated user."""
    server = FakeServer(tokens=1)
    work = workloads.multi_turn(users=2, rounds=2, system_tokens=4, question_tokens=2, seed=1)
    run(work, server, send_session=True)
    assert [b["user"] for b in server.bodies] == ["user-0", "user-1", "user-0", "user-1"]
    quiet = FakeServer(tokens=1)
    run(work, quiet)
    assert not any("user" in b for b in quiet.bodies)  # off by default
