"""Property-based test: thousands of generated bodies (well-formed, ill-typed, out of range, mangled
bytes) sent to both generate routes of a real server never get a 500, every error is OpenAI's error
object, every stream ends with [DONE] or an error event, and the server is healthy afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import make_adapter, make_tiny_model
from server_harness import ENGINE_KW, Server

EXAMPLES = 600  # per route and per kind of body: 2,400 bodies in all
SENT = {"count": 0, "ok": 0}

scalars = (st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70) | st.floats()
           | st.text(max_size=12))
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def field(valid: st.SearchStrategy, invalid: st.SearchStrategy = st.nothing()) -> st.SearchStrategy:
    """Mostly a valid value of the field, sometimes an invalid one of the right type, sometimes anything JSON
    holds: with a dozen fields a body, about a third of the bodies are valid requests."""
    return st.integers(min_value=0, max_value=23).flatmap(
        lambda i: valid if i < 22 else invalid if i == 22 else anything)


token_ids = st.lists(st.integers(min_value=3, max_value=250), min_size=1, max_size=8)
bad_ids = st.lists(st.integers(min_value=-3, max_value=2 ** 70), max_size=8)
SAMPLING = {
    "model": field(st.sampled_from(["tiny", "qv", "tiny:qv"]), st.sampled_from(["other:qv", "nope", ""])),
    "max_tokens": field(st.integers(min_value=1, max_value=6), st.integers(min_value=-1, max_value=0)),
    "temperature": field(st.floats(min_value=0, max_value=2), st.sampled_from([-1.0, float("nan"), float("inf")])),
    "top_p": field(st.floats(min_value=0.05, max_value=1), st.sampled_from([0.0, 1.5])),
    "top_k": field(st.integers(min_value=-1, max_value=50), st.just(-2)),
    "min_p": field(st.floats(min_value=0, max_value=0.5), st.sampled_from([-0.1, 1.5, float("nan")])),
    "n": field(st.integers(min_value=1, max_value=3), st.integers(min_value=-1, max_value=0)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})),
    "stop": field(st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=3)),
    "stop_token_ids": field(token_ids, bad_ids),
    "seed": field(st.integers(min_value=0, max_value=2 ** 63 - 1), st.integers(min_value=2 ** 63, max_value=2 ** 70)),
    "echo": field(st.booleans()),
    "ignore_eos": field(st.booleans()),
    "min_tokens": field(st.integers(min_value=0, max_value=1), st.just(-1)),
    "user": field(st.text(max_size=8)),
}
COMPLETION = dict(SAMPLING, prompt=field(st.text(min_size=1, max_size=40) | token_ids
                                         | st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=2),
                                         bad_ids | st.lists(bad_ids, max_size=3)),
                  logprobs=field(st.integers(min_value=0, max_value=5), st.integers(min_value=21, max_value=30)))
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": st.fixed_dictionaries({"url": st.sampled_from(
                               ["data:image/png;base64,AAAA", "http://127.0.0.1:9/x.png", "", "data:,"])})}),
    anything)
message = st.fixed_dictionaries({"role": field(st.sampled_from(["user", "assistant", "system"]),
                                               st.sampled_from(["tool", ""]))},
                                optional={"content": field(st.text(max_size=30), st.lists(part, max_size=3)),
                                          "name": st.text(max_size=5)})
CHAT = dict(SAMPLING, messages=field(st.lists(message, min_size=1, max_size=3), st.just([])),
            logprobs=field(st.booleans()), top_logprobs=field(st.integers(min_value=0, max_value=5),
                                                              st.integers(min_value=21, max_value=30)),
            max_completion_tokens=field(st.integers(min_value=1, max_value=6)),
            add_generation_prompt=field(st.booleans()))


def bodies(fields: dict, required: tuple[str, ...]) -> st.SearchStrategy:
    """Request bodies: usually with the required fields, each other field present or not."""
    rest = {k: v for k, v in fields.items() if k not in required}
    return st.one_of(st.fixed_dictionaries({k: fields[k] for k in required}, optional=rest),
                     st.fixed_dictionaries({k: fields[k] for k in required}, optional=rest),
                     st.fixed_dictionaries({}, optional=fields))


def encode(body: dict) -> bytes:
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


def mangled(fields: dict) -> st.SearchStrategy:
    """Bodies that are not valid requests at the byte level: truncated, spliced, or random bytes."""
    whole = st.fixed_dictionaries({}, optional=fields).map(encode)
    return st.one_of(
        st.binary(max_size=64),
        st.tuples(whole, st.integers(min_value=0, max_value=200)).map(lambda t: t[0][:t[1]]),
        st.tuples(whole, st.binary(min_size=1, max_size=4), st.integers(min_value=0, max_value=200))
        .map(lambda t: t[0][:t[2]] + t[1] + t[0][t[2]:]),
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model_dir = make_tiny_model(root / "model", family="llama")
    qv = make_adapter(model_dir, root / "qv", seed=1, r=8, target_modules=["q_proj", "v_proj"])
    # a short max_model_len keeps requests without max_tokens (they run to the end of it) quick
    s = Server(model_dir, {"qv": qv}, engine_kw=dict(ENGINE_KW, max_model_len=96))
    with httpx.Client(base_url=s.url, timeout=60) as h:
        s.http = h
        yield s
    s.stop()


def check(server: Server, route: str, body: bytes) -> None:
    SENT["count"] += 1
    with server.http.stream("POST", route, content=body, headers={"content-type": "application/json"}) as r:
        data = r.read()
    assert r.status_code < 500, (r.status_code, body[:300], data[:300])
    SENT["ok"] += r.status_code == 200
    if r.status_code >= 400:
        err = json.loads(data)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in data.decode().splitlines() if line.startswith("data: ")]
        assert events, data[:300]
        last = events[-1]
        assert last == "[DONE]" or "error" in json.loads(last), last
        assert all("internal_error" not in e for e in events), events[-1]
    else:
        assert json.loads(data)["choices"] is not None


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@FUZZ
@given(body=bodies(COMPLETION, ("model", "prompt")))
def test_completions_bodies(server, body) -> None:
    check(server, "/v1/completions", encode(body))


@FUZZ
@given(body=bodies(CHAT, ("model", "messages")))
def test_chat_bodies(server, body) -> None:
    check(server, "/v1/chat/completions", encode(body))


@FUZZ
@given(body=mangled(COMPLETION))
def test_completions_mangled_bytes(server, body) -> None:
    check(server, "/v1/completions", body)


@FUZZ
@given(body=mangled(CHAT))
def test_chat_mangled_bytes(server, body) -> None:
    check(server, "/v1/chat/completions", body)


def test_healthy_after_fuzzing(server) -> None:
    assert SENT["count"] >= 4 * EXAMPLES * 0.9, SENT  # hypothesis may stop a strategy early if it is exhausted
    print(f"fuzzed the generate routes with {SENT['count']} bodies, {SENT['ok']} of them served (200)")
    assert SENT["ok"] >= 300, SENT  # the generators reach the engine, not only the validators
    assert server.http.get("/health").status_code == 200
    r = server.http.post("/v1/completions", json={"model": "qv", "prompt": "hello", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    stats = server.engine.stats
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_usage"] == 0.0
