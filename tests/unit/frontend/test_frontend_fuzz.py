"""Bad input at the frontend: property-based fuzzing of every route over real loopback sockets.

Expected behaviour, asserted for every generated request (several hundred per run):
- the answer is a 2xx or a 4xx, never a 5xx, and always arrives (no hang: a 10 s client timeout);
- an error the frontend makes itself has OpenAI's shape `{"error": {message, type, param, code}}`;
- with an API key configured, every route but `/health` answers 401 unless the request carries
  `Authorization: Bearer <key>` (scheme in any case), and a request with the key never gets 401;
- afterwards the frontend is healthy and still counts its worker healthy (no input poisons it).

Inputs: JSON bodies with the OpenAI fields given wrong types, huge and negative numbers, unicode
(lone surrogates included), missing required fields and arbitrary extra ones; bodies that are not
a JSON object (other JSON values, truncated JSON, random bytes, invalid UTF-8, NaN/Infinity
tokens, numbers of thousands of digits, arrays nested 100,000 deep); every content type; API key
header variants; non-ASCII request ids; other methods and unknown paths. The worker behind the
frontend is a tolerant fake that answers anything (vLLM's own validation is vLLM's business):
what is tested is that the frontend itself never fails.
"""

from __future__ import annotations

import json

import httpx
import pytest
from frontend_support import ServerThread, pool_of
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dynkv.frontend import create_app
from dynkv.frontend.config import FrontendConfig

KEY = "sk-fuzz-Ünïcode-key"  # non-ASCII on purpose: compared as bytes
MODEL = "m"
PATHS = ["/v1/chat/completions", "/v1/completions"]


# ---- a worker that answers anything ------------------------------------------------------------


async def _complete(request: Request) -> Response:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        return JSONResponse({"error": {"message": "bad body", "type": "BadRequestError"}}, 400)
    if body.get("stream") is True:

        async def events():
            yield b'data: {"choices": [{"index": 0, "text": "ok"}]}\n\n'
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
    return JSONResponse({"id": "x", "object": "text_completion", "choices": []})


def tolerant_worker() -> Starlette:
    async def health(_request: Request) -> Response:
        return Response(status_code=200)

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/chat/completions", _complete, methods=["POST"]),
            Route("/v1/completions", _complete, methods=["POST"]),
        ]
    )


@pytest.fixture(scope="module")
def frontend():
    with ServerThread(tolerant_worker()) as worker:
        cfg = FrontendConfig(health_interval=0.2, api_key=KEY, models=(MODEL,))
        app = create_app(cfg, pool=pool_of(("agg-0", worker.url), model=MODEL), discover=False)
        with ServerThread(app) as fe, httpx.Client(base_url=fe.url, timeout=10) as client:
            yield fe, client


# ---- inputs ------------------------------------------------------------------------------------

big_ints = st.integers(min_value=-(2**80), max_value=2**80)
leaves = (
    st.none()
    | st.booleans()
    | big_ints
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "nobody"])},
        optional={"content": st.text(max_size=30) | json_values, "name": json_values},
    ),
    max_size=3,
)
FIELDS = {
    "model": st.sampled_from([MODEL, MODEL, MODEL, "unknown-model", ""]) | json_values,
    "messages": messages | json_values,
    "prompt": st.text(max_size=40) | st.lists(big_ints, max_size=5) | json_values,
    "stream": st.booleans() | json_values,
    "max_tokens": big_ints | json_values,
    "temperature": st.floats() | json_values,
    "n": big_ints,
    "logprobs": big_ints | st.booleans(),
    "cache_salt": st.text(max_size=20) | json_values,
    "kv_transfer_params": json_values,
    "stream_options": json_values,
}
objects = st.fixed_dictionaries({}, optional=FIELDS).flatmap(
    lambda known: st.dictionaries(st.text(max_size=10), json_values, max_size=3).map(
        lambda extra: {**extra, **known}
    )
)


def _dumps(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


bodies = st.one_of(
    objects.map(_dumps),  # mostly well-formed JSON objects with odd fields
    objects.map(_dumps),
    objects.map(_dumps),
    json_values.map(_dumps),  # JSON, but not an object
    st.tuples(objects.map(_dumps), st.integers(0, 60)).map(lambda t: t[0][: t[1]]),  # truncated
    st.binary(max_size=64),  # not JSON at all, often not UTF-8
    st.sampled_from(
        [
            b"",
            b"{",
            b'{"model": "m", "prompt": NaN, "max_tokens": Infinity}',
            b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
            b'{"model": "m", "prompt": "\\ud800"}',
            b'{"model": "m", "prompt": "\xff\xfe"}',
            b"[" * 100_000 + b"]" * 100_000,
            b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            b'\xef\xbb\xbf{"model": "m", "prompt": "bom"}',
            json.dumps({"model": MODEL, "prompt": "x" * 2_000_000}).encode(),
        ]
    ),
)
content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=latin-1",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "",
        "*/*",
        "application/json\tjunk",
    ]
)
GOOD_AUTH = [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER  {KEY}"]  # h11 sends no edge spaces
BAD_AUTH = [None, "", "Bearer", f"Basic {KEY}", KEY, "Bearer wrong", f"Bearer {KEY}x", "Bearer é"]
auth_headers = st.sampled_from(GOOD_AUTH * 3 + BAD_AUTH)
request_ids = st.none() | st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=30
).map(str.strip)  # HTTP allows no whitespace at either end of a header value
methods_and_paths = st.one_of(
    st.tuples(st.just("POST"), st.sampled_from(PATHS)),
    st.tuples(st.just("POST"), st.sampled_from(PATHS)),
    st.tuples(st.just("POST"), st.sampled_from(PATHS)),
    st.tuples(
        st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "POST"]),
        st.sampled_from(
            [*PATHS, "/v1/models", "/v1/models/m", "/v1/models/%ff%00", "/metrics", "/health"]
            + ["/", "/v1", "/v1/embeddings", "/v1/chat/completions/", "/../etc/passwd"]
        ),
    ),
)


def _header(value: str) -> bytes:
    return value.encode("utf-8")


def _send(client: httpx.Client, method: str, path: str, body: bytes, headers: dict[str, bytes]):
    content = body if method not in ("GET", "HEAD", "OPTIONS") else None
    return client.request(method, path, content=content, headers=headers)


def _check(resp: httpx.Response, *, authorized: bool, path: str, method: str) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    if path != "/health":
        assert (resp.status_code == 401) == (not authorized), (resp.status_code, resp.text[:300])
    from_frontend = "x-dynkv-worker" not in resp.headers
    if 400 <= resp.status_code < 500 and from_frontend and method != "HEAD":
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code", "request_id"}, error


def test_fuzzed_requests_get_a_2xx_or_4xx_and_leave_the_frontend_healthy(frontend):
    """Every fuzzed request is answered (never a 5xx, a hang or a crash), and afterwards the
    frontend still serves: checked in the same test, so it holds in any test order."""
    _fe, client = frontend

    @settings(
        max_examples=400,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        target=methods_and_paths,
        body=bodies,
        content_type=content_types,
        auth=auth_headers,
        request_id=request_ids,
    )
    @example(
        ("POST", PATHS[0]), b"[" * 100_000 + b"]" * 100_000, "application/json", GOOD_AUTH[0], None
    )
    @example(
        ("POST", PATHS[1]), b'{"model": "m", "prompt": "x"}', "application/json", GOOD_AUTH[0], "é"
    )
    @example(("GET", "/v1/models/%ff%00"), b"", "application/json", GOOD_AUTH[0], None)  # 404 + id
    def one_request(target, body, content_type, auth, request_id):
        method, path = target
        headers = {"content-type": _header(content_type)}
        if auth is not None:
            headers["authorization"] = _header(auth)
        if request_id:
            headers["x-request-id"] = request_id.encode("latin-1")
        authorized = auth in GOOD_AUTH
        if b'"stream": true' in body and method == "POST":
            with client.stream(method, path, content=body, headers=headers) as resp:
                resp.read()  # a stream must end, not hang
        else:
            resp = _send(client, method, path, body, headers)
        _check(resp, authorized=authorized, path=path, method=method)

    one_request()
    assert_still_healthy(client)


def test_every_route_but_health_needs_the_key(frontend):
    """Whatever routes the app has (and any it may gain), only /health is open."""
    fe, client = frontend
    app_paths = {r.path for r in fe.server.config.app.routes if hasattr(r, "path")}
    assert "/health" in app_paths and "/v1/chat/completions" in app_paths
    for route in fe.server.config.app.routes:
        path = getattr(route, "path", None)
        if path is None:
            continue
        concrete = path.replace("{model:path}", MODEL)
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            resp = client.request(method, concrete, content=b"{}")
            if path == "/health":
                assert resp.status_code == 200, resp.text
            else:
                assert resp.status_code == 401, (method, path, resp.status_code)
                assert resp.headers["www-authenticate"] == "Bearer"
                assert KEY not in resp.text


def assert_still_healthy(client: httpx.Client) -> None:
    health = client.get("/health").json()
    assert health == {"status": "ok"}, health  # no detail without the key
    auth = {"authorization": f"Bearer {KEY}".encode()}
    assert client.get("/health", headers=auth).json()["healthy_workers"] == 1
    ok = client.post(
        PATHS[1],
        json={"model": MODEL, "prompt": "x"},
        headers={"authorization": f"Bearer {KEY}".encode()},
    )
    assert ok.status_code == 200, ok.text
