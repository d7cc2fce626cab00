"""The OpenAI-compatible server, live on loopback: chat (text, images, streaming, logprobs, n, stop),
errors in OpenAI's shape, metrics, continuous batching and cancellation on disconnect.

Cold start, auth, the queue bound, the context limit and SIGTERM are in test_server_lifecycle.py.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
import uvicorn
from PIL import Image

from jvlm.server import Settings, create_app
from jvlm.server.cli import uvicorn_config
from jvlm.server.images import make_image_loader

MODEL = "jina-vlm"


# ---------------------------------------------------------------------------------------------- helpers
def live_config(app) -> uvicorn.Config:
    """``jvlm serve``'s uvicorn configuration for ``app`` (its protocol with the request-head deadline), with a
    short shutdown deadline for tests."""
    settings = app.state.settings
    if settings.log_level in ("info", "debug"):  # no access log lines in the test output
        settings = settings.model_copy(update={"log_level": "warning"})
    config = uvicorn_config(app, settings)
    config.timeout_graceful_shutdown = 5
    return config


class LiveServer:
    """A uvicorn server for ``app`` in a background thread, on a free loopback port."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(live_config(app))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    @property
    def vlm(self):
        return self.app.state.host.vlm

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/ready").status_code != 200:
            assert self.app.state.host.state != "failed", self.app.state.host.error
            assert time.monotonic() < deadline, "the model did not become ready"
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def png_bytes(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    image = Image.new("RGB", (width, height))
    image.putdata([((x * 7 + seed * 40) % 256, (y * 5) % 256, (x * y + seed) % 256)
                   for y in range(height) for x in range(width)])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(text: str, *images: str) -> list[dict]:
    return [{"role": "user", "content": [*(image_part(u) for u in images), {"type": "text", "text": text}]}]


def sse_events(response: httpx.Response) -> list:
    """The JSON payloads of an SSE stream, then the literal "[DONE]"."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(tiny_dir):
    settings = Settings(model=str(tiny_dir), max_body_bytes=1 << 20, allow_private_urls=True, log_level="warning")
    with LiveServer(create_app(settings)) as live:
        live.wait_ready()
        yield live


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def image_host():
    """A loopback HTTP server with one PNG at /cat.png."""
    body = png_bytes(seed=3)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", body
    httpd.shutdown()
    httpd.server_close()


def chat(api: httpx.Client, **body) -> httpx.Response:
    body.setdefault("model", MODEL)
    body.setdefault("temperature", 0)
    return api.post("/v1/chat/completions", json=body)


# ---------------------------------------------------------------------------------------------- plain routes
def test_health_ready_and_openapi(api):
    assert api.get("/health").json() == {"status": "ok"}
    assert api.get("/ready").status_code == 200
    spec = api.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics"} <= set(spec["paths"])
    schema = spec["components"]["schemas"]["ChatCompletionRequest"]
    assert schema["additionalProperties"] is False and "top_logprobs" in schema["properties"]
    assert_error(api.get("/nowhere"), 404, code="not_found")


def test_models(client, api, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = api.get("/v1/models").json()["data"][0]
    assert card["object"] == "model" and card["max_model_len"] == server.vlm.context_length
    assert client.models.retrieve(MODEL).id == MODEL
    assert_error(api.get("/v1/models/gpt-4o"), 404, code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_assistant_turns_from_the_sdk_replay_as_history(client):
    """The usual loop: append the returned message (with its null refusal/tool_calls/audio...) and ask again."""
    messages = [{"role": "user", "content": "Say hi"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    messages += [first.choices[0].message.model_dump(), {"role": "user", "content": "Again"}]
    assert messages[1]["refusal"] is None and "tool_calls" in messages[1]
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3,
                                            response_format={"type": "text"})
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    messages[1]["tool_calls"] = []
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)


# ---------------------------------------------------------------------------------------------- chat
def test_chat_text_with_openai_client(client, server, tiny_dir):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # random weights do not stop on their own this early
    assert out.usage.completion_tokens == 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6
    assert out.usage.prompt_tokens_details.cached_tokens >= 0
    # the model id/path given to the server is a valid name too; max_completion_tokens wins over max_tokens
    again = client.chat.completions.create(model=str(tiny_dir), messages=messages, max_completion_tokens=6,
                                           max_tokens=50, temperature=0)
    assert again.choices[0].message.content == choice.message.content


def test_missing_model_means_the_served_one(api):
    r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL


def test_images_multi_turn_usage(api, image_host):
    url, raw = image_host
    a, b = data_uri(png_bytes(seed=1)), data_uri(png_bytes(80, 40, seed=2))
    messages = [
        *user("Compare these two.", a, b),
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, image_part(url + "/cat.png")]},
    ]
    r = chat(api, messages=messages, max_tokens=3)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    details = usage["prompt_tokens_details"]
    assert set(details) == {"cached_tokens", "image_tokens"}
    assert details["image_tokens"] > 0 and usage["prompt_tokens"] > details["image_tokens"]
    # the same picture by URL and as a data URI costs the same image tokens
    by_url = chat(api, messages=user("?", url + "/cat.png"), max_tokens=1).json()["usage"]
    by_uri = chat(api, messages=user("?", data_uri(raw)), max_tokens=1).json()["usage"]
    assert by_url["prompt_tokens_details"]["image_tokens"] == by_uri["prompt_tokens_details"]["image_tokens"] > 0
    assert by_url["prompt_tokens"] == by_uri["prompt_tokens"]
    # image options are honoured: fewer crops, fewer image tokens
    big = data_uri(png_bytes(700, 500, seed=4))
    full = chat(api, messages=user("?", big), max_tokens=1).json()["usage"]["prompt_tokens_details"]
    small = chat(api, messages=user("?", big), max_tokens=1, max_crops=1).json()["usage"]["prompt_tokens_details"]
    assert small["image_tokens"] < full["image_tokens"]


def test_streaming_matches_non_streaming(client, api):
    messages = user("Tell me a story.")
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    # the raw SSE wire format: data lines, [DONE] last, no usage key unless asked for
    with api.stream("POST", "/v1/chat/completions",
                     json={"model": MODEL, "messages": messages, "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-2]["choices"][0]["delta"] == {} and events[-2]["choices"][0]["finish_reason"] == "length"


def _check_logprob_entry(entry: dict, top: int) -> None:
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
    assert entry["logprob"] <= 0 and all(0 <= b < 256 for b in entry["bytes"])
    assert len(entry["top_logprobs"]) == top
    assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][-1]["logprob"]
    assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy picks the top one
    assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"] or "\ufffd" in entry["token"]


def test_logprobs_non_stream_and_stream(api, client):
    body = {"messages": user("Name a colour."), "max_tokens": 5, "logprobs": True, "top_logprobs": 3}
    r = chat(api, **body)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    for entry in content:
        _check_logprob_entry(entry, 3)
    assert "".join(e["token"] for e in content) == r.json()["choices"][0]["message"]["content"]

    with api.stream("POST", "/v1/chat/completions", json={**body, "model": MODEL, "temperature": 0,
                                                            "stream": True}) as s:
        events = sse_events(s)
    streamed = [e for ev in events[:-1] for c in ev["choices"] if c["logprobs"] for e in c["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-4)

    # the official client parses the same shape
    out = client.chat.completions.create(model=MODEL, messages=user("Name a colour."), max_tokens=2, temperature=0,
                                         logprobs=True, top_logprobs=2)
    assert len(out.choices[0].logprobs.content) == 2 and len(out.choices[0].logprobs.content[0].top_logprobs) == 2
    plain = chat(api, messages=user("Name a colour."), max_tokens=2).json()
    assert plain["choices"][0]["logprobs"] is None


def test_top_logprobs_validation(api):
    assert_error(chat(api, messages=user("x"), top_logprobs=2), 400, code="invalid_value", param="top_logprobs")
    assert_error(chat(api, messages=user("x"), logprobs=True, top_logprobs=21), 400, param="top_logprobs")


def test_n_choices(api, client):
    r = chat(api, messages=user("Pick a number."), max_tokens=4, n=2)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["choices"][0]["message"]["content"] == out["choices"][1]["message"]["content"]  # greedy
    assert out["usage"]["completion_tokens"] == 8
    stream = client.chat.completions.create(model=MODEL, messages=user("Pick a number."), max_tokens=4, n=2,
                                            temperature=0, stream=True)
    texts = {0: "", 1: ""}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts[0] == texts[1] == out["choices"][0]["message"]["content"]
    sampled = chat(api, messages=user("Pick a number."), max_tokens=4, n=2, temperature=1.0, seed=7).json()
    again = chat(api, messages=user("Pick a number."), max_tokens=4, n=2, temperature=1.0, seed=7).json()
    assert [c["message"]["content"] for c in sampled["choices"]] == [c["message"]["content"] for c in again["choices"]]


def test_stop_strings(api):
    full = chat(api, messages=user("Write a line."), max_tokens=16).json()["choices"][0]["message"]["content"]
    stop = full[6:9]
    cut = full[: full.find(stop)]
    for form in (stop, ["@@never@@", stop]):
        out = chat(api, messages=user("Write a line."), max_tokens=16, stop=form).json()["choices"][0]
        assert out["finish_reason"] == "stop" and out["message"]["content"] == cut
    with api.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": user("Write a line."),
                                                            "max_tokens": 16, "temperature": 0, "stop": stop,
                                                            "stream": True}) as r:
        events = sse_events(r)
    text = "".join(c["delta"].get("content", "") for e in events[:-1] for c in e["choices"])
    assert text == cut and events[-2]["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("case", [
    "bad_json", "bad_base64", "not_an_image", "not_image_media_type", "local_path", "too_many_images", "tools",
    "nested_unknown_field", "unknown_role", "bad_temperature", "empty_messages", "not_an_object", "string_message",
    "tool_call_history", "json_mode", "n_over_queue", "stream_options_without_stream", "nan_temperature",
    "logprobs_not_bool",
])
def test_bad_requests_are_400(api, server, monkeypatch, case):
    ok_image = data_uri(png_bytes())
    bodies = {
        "bad_base64": {"messages": user("?", "data:image/png;base64,@@not base64@@")},
        "not_an_image": {"messages": user("?", data_uri(b"this is plain text, not a picture"))},
        "not_image_media_type": {"messages": user("?", data_uri(png_bytes(), "text/plain"))},
        "local_path": {"messages": user("?", "/etc/hostname")},
        "too_many_images": {"messages": user("?", *[ok_image] * 9)},
        "tools": {"messages": user("hi"), "tools": [{"type": "function", "function": {"name": "f"}}]},
        "nested_unknown_field": {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]},
        "unknown_role": {"messages": [{"role": "tool", "content": "x"}]},
        "bad_temperature": {"messages": user("hi"), "temperature": -1},
        "empty_messages": {"messages": []},
        "string_message": {"messages": ["hi"]},
        "tool_call_history": {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]},
        "json_mode": {"messages": user("hi"), "response_format": {"type": "json_object"}},
        "n_over_queue": {"messages": user("hi"), "n": 8},
        "stream_options_without_stream": {"messages": user("hi"), "stream_options": {"include_usage": True}},
        "logprobs_not_bool": {"messages": user("hi"), "logprobs": "yes"},
    }
    expected = {
        "bad_json": ("invalid_json", None), "bad_base64": ("invalid_image", "messages"),
        "not_an_image": ("invalid_image", "messages"), "not_image_media_type": ("invalid_image", "messages"),
        "local_path": ("invalid_image", "messages"), "too_many_images": ("too_many_images", "messages"),
        "tools": ("unsupported_parameter", "tools"),
        "nested_unknown_field": ("unsupported_parameter", "messages.0.content.0.cache_control"),
        "unknown_role": ("invalid_value", "messages"),
        "bad_temperature": ("invalid_value", "temperature"), "empty_messages": ("invalid_value", "messages"),
        "not_an_object": ("invalid_request_body", None), "string_message": ("invalid_value", "messages"),
        "tool_call_history": ("invalid_value", "messages"), "json_mode": ("invalid_value", "response_format"),
        "n_over_queue": ("invalid_value", "n"),
        "stream_options_without_stream": ("invalid_value", "stream_options"),
        "nan_temperature": ("invalid_value", "temperature"), "logprobs_not_bool": ("invalid_value", "logprobs"),
    }
    if case == "bad_json":
        r = api.post("/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"})
    elif case == "n_over_queue":
        monkeypatch.setattr(server.vlm.engine, "max_waiting", 4)  # --max-queue 4: 8 choices can never be queued
        r = chat(api, **bodies[case])
    elif case == "nan_temperature":  # Python's json module writes (and FastAPI reads) a bare NaN
        r = api.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "hi"}], '
                     b'"temperature": NaN}', headers={"Content-Type": "application/json"})
        assert "finite" in r.json()["error"]["message"]
    elif case == "not_an_object":
        r = api.post("/v1/chat/completions", content=b'[5]', headers={"Content-Type": "application/json"})
    else:
        r = chat(api, **bodies[case])
    code, param = expected[case]
    error = assert_error(r, 400, code=code, param=param)
    assert error["type"] == "invalid_request_error"
    if case == "tools":
        assert "tools" in error["message"]


@pytest.mark.parametrize(("case", "status", "code", "says"), [
    ("not_utf8", 400, "invalid_json", "not UTF-8 encoded JSON"),
    ("latin1_charset", 400, "invalid_json", "declared as charset=latin-1, but JSON must be sent as UTF-8"),
    ("huge_integer", 400, "invalid_json", "number too large to parse"),
    ("deeply_nested", 400, "invalid_json", "nested too deeply"),
    ("gzip", 415, "unsupported_content_encoding", "Content-Encoding gzip is not supported; send an uncompressed body"),
])
def test_unparseable_bodies_are_errors_that_say_why(api, case, status, code, says):
    """Not FastAPI's generic 'There was an error parsing the body' without a code (415 for a content coding
    jvlm does not decode, RFC 9110 §15.5.16)."""
    json_type = {"Content-Type": "application/json"}
    hi = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1'
    content, headers = {
        "not_utf8": (hi + b', "user": "\xff\xfe"}', json_type),
        "latin1_charset": ('{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1"),
                           {"Content-Type": "application/json; charset=latin-1"}),
        "huge_integer": (hi + b', "seed": ' + b"9" * 5000 + b"}", json_type),
        "deeply_nested": (hi + b', "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", json_type),
        "gzip": (gzip.compress(hi + b"}"), {**json_type, "Content-Encoding": "gzip"}),
    }[case]
    error = assert_error(api.post("/v1/chat/completions", content=content, headers=headers), status, code=code)
    assert says in error["message"] and error["type"] == "invalid_request_error"
    if case == "latin1_charset":  # a declared charset is not refused as such: ASCII is the same in UTF-8
        ascii_body = api.post("/v1/chat/completions", content=hi + b"}",
                              headers={"Content-Type": "application/json; charset=latin-1"})
        assert ascii_body.status_code == 200, ascii_body.text


def test_unknown_model_is_404(api, client):
    assert_error(chat(api, model="gpt-4o", messages=user("hi")), 404, code="model_not_found", param="model")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=user("hi"))


def test_body_too_large_is_413(api):
    big = data_uri(b"\x89PNG" + b"\0" * (1 << 20))
    assert_error(chat(api, messages=user("?", big)), 413, code="request_too_large")
    chunked = api.post("/v1/chat/completions", content=iter([b"{" + b" " * (600 << 10), b" " * (600 << 10) + b"}"]),
                        headers={"Content-Type": "application/json"})
    assert_error(chunked, 413, code="request_too_large")


def test_unexpected_error_is_a_generic_500(api, server, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(server.vlm, "prepare", broken)
    with caplog.at_level("ERROR", logger="jvlm.server"):
        error = assert_error(chat(api, messages=user("hi")), 500, code="internal_error")
    assert error["type"] == "server_error" and "secret" not in error["message"]
    assert "secret internal detail" in caplog.text  # logged with its traceback, not sent


def test_private_urls_are_refused_by_default(image_host):
    from jvlm.errors import ImageFetchError

    loader = make_image_loader(Settings())
    with pytest.raises(ImageFetchError, match="loopback"):
        loader(image_host[0] + "/cat.png")
    assert make_image_loader(Settings(allow_private_urls=True))(image_host[0] + "/cat.png").size == (64, 48)
    assert make_image_loader(Settings(allowed_hosts=["127.0.0.1"]))(image_host[0] + "/cat.png").size == (64, 48)


# ---------------------------------------------------------------------------------------------- engine sharing
def test_concurrent_streams_are_batched_and_exact(server):
    """8 streaming clients at once: they share decode steps, and each gets exactly the tokens it gets alone."""
    prompts = [f"Question number {i}: what is {i} + {i}?" for i in range(8)]
    body = {"model": MODEL, "max_tokens": 24, "temperature": 0, "logprobs": True, "stream": True}

    def run(prompt: str, barrier: threading.Barrier | None = None) -> list[str]:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            if barrier is not None:
                barrier.wait(timeout=30)
            with c.stream("POST", "/v1/chat/completions", json={**body, "messages": user(prompt)}) as r:
                assert r.status_code == 200
                events = sse_events(r)
        assert events[-1] == "[DONE]"
        return [e["token"] for ev in events[:-1] for ch in ev["choices"] if ch["logprobs"]
                for e in ch["logprobs"]["content"]]

    alone = [run(p) for p in prompts]
    engine = server.vlm.engine
    sizes: list[int] = []
    decode = engine._decode

    def recording_decode(batch):
        sizes.append(len(batch))
        return decode(batch)

    engine._decode = recording_decode
    try:
        results: list[list[str] | None] = [None] * len(prompts)
        barrier = threading.Barrier(len(prompts))

        def worker(i: int) -> None:
            results[i] = run(prompts[i], barrier)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    finally:
        del engine._decode
    assert all(len(r) == 24 for r in alone)
    assert results == alone
    assert max(sizes) >= 4, sizes  # several sequences advanced in one forward pass
    assert len(sizes) < 8 * 23  # far fewer decode steps than serving them one at a time


def test_disconnect_mid_stream_cancels_generation(server):
    engine = server.vlm.engine
    before = engine.stats.completion_tokens
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": user("Go on forever."),
                                                            "max_tokens": 4000, "temperature": 0,
                                                            "stream": True}) as r:
            seen = 0
            for line in r.iter_lines():
                if '"content"' in line:
                    seen += 1
                if seen >= 3:
                    break
            assert engine.num_running == 1
    deadline = time.monotonic() + 5
    while engine.num_running or engine.queue_depth:
        assert time.monotonic() < deadline, "generation went on after the client left"
        time.sleep(0.02)
    assert engine.stats.completion_tokens - before < 500


def test_disconnect_while_waiting_cancels_non_streaming(server):
    engine = server.vlm.engine
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", timeout=httpx.Timeout(30, read=0.5),
                   json={"model": MODEL, "messages": user("Go on forever."), "max_tokens": 4000})
    deadline = time.monotonic() + 5
    while engine.num_running or engine.queue_depth:
        assert time.monotonic() < deadline, "generation went on after the client left"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics(api):
    image = image_part(data_uri(png_bytes(seed=9)))
    for text in ("One", "Two"):  # the second time the image features come from the cache
        messages = [{"role": "user", "content": [{"type": "text", "text": text}, image]}]
        assert chat(api, messages=messages, max_tokens=3).status_code == 200
    r = api.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['jvlm_http_requests_total{route="/v1/chat/completions",status="200"}'] >= 2
    assert samples["jvlm_model_ready"] == 1
    assert samples["jvlm_prompt_tokens_total"] > 0 and samples["jvlm_completion_tokens_total"] >= 6
    assert samples["jvlm_prompt_image_tokens_total"] > 0
    assert samples["jvlm_queue_depth"] == 0 and samples["jvlm_running_requests"] == 0
    assert samples["jvlm_time_to_first_token_seconds_count"] >= 2
    assert samples['jvlm_time_to_first_token_seconds_bucket{le="+Inf"}'] == samples[
        "jvlm_time_to_first_token_seconds_count"]
    assert samples["jvlm_engine_decode_tokens_per_second"] > 0
    assert samples["jvlm_request_tokens_per_second_count"] >= 2
    assert samples["jvlm_image_cache_hits_total"] >= 1
