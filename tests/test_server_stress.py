"""Hostile input and heavy load, live on loopback (bounded in count and time).

- Per-request limits: total image pixels, max_tokens clamped to the context, the in-flight bound (503 +
  Retry-After), the body time limit (408), the request timeout freeing a queued request at once, ``file:``
  URLs only inside ``allow_file_dir``, and the flags that set them.
- 32 concurrent clients mixing streaming and non-streaming, with and without images: no 5xx, every greedy
  answer equal to its single-client answer; afterwards nothing running or queued, no KV cache alive beyond
  the prefix cache's, RSS near its baseline.
- Clients that disconnect mid-stream, send half a body or never read; requests that fail in the middle of a
  batch (an image that does not decode, a failure in the engine's prefill or decode step): everyone else is
  served exactly, and the hostile or failed requests' work is freed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import gc
import json
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from pydantic import ValidationError

from jvlm.engine.engine import RequestHandle, _Request
from jvlm.engine.kv_cache import KVCache
from jvlm.engine.sampling import SamplingParams
from jvlm.errors import ImageError
from jvlm.processor import Prompt
from jvlm.server import Settings, add_serve_arguments, create_app
from jvlm.server.app import Generation
from jvlm.server.images import make_image_loader
from test_server import MODEL, LiveServer, assert_error, data_uri, live_config, png_bytes, sse_events, user
from test_server_lifecycle import wait_until

MAX_BATCH = 8
HEADER_TIMEOUT = 1.0  # --header-timeout in the test of it (the other tests keep the default)
SEND_BUFFER = 4096  # the server's socket send buffer: a client that never reads stalls its stream quickly
PIXELS_PER_IMAGE, PIXELS_PER_REQUEST = 9_000, 10_000  # the load's 64x48 images are 3,072 pixels each


class SmallBufferServer(LiveServer):
    """``LiveServer`` whose connections get a small kernel send buffer (accepted sockets inherit it)."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(live_config(app))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    @property
    def in_flight(self) -> int:
        return self.app.state.metrics.in_flight

    def idle(self) -> bool:
        engine = self.vlm.engine
        return engine.num_running == 0 and engine.queue_depth == 0 and self.in_flight == 0


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """An allowed image directory (a PNG, a symlink pointing out of it) next to a file outside it."""
    root = tmp_path_factory.mktemp("file-urls")
    (root / "images").mkdir()
    (root / "images" / "cat.png").write_bytes(png_bytes(seed=5))
    (root / "secret.png").write_bytes(png_bytes(seed=6))
    (root / "images" / "link.png").symlink_to(root / "secret.png")
    return root


@pytest.fixture(scope="module")
def server(tiny_dir, files):
    settings = Settings(model=str(tiny_dir), max_batch=MAX_BATCH, max_queue=56, write_timeout=1.0, body_timeout=1.5,
                        max_image_pixels=PIXELS_PER_IMAGE, max_total_image_pixels=PIXELS_PER_REQUEST,
                        allow_file_dir=files / "images", log_level="critical")
    with SmallBufferServer(create_app(settings)) as live:
        live.wait_ready()
        yield live


@pytest.fixture
def api(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client
    wait_until(server.idle, 15, "the server to be idle")  # every test leaves nothing behind


# ---------------------------------------------------------------------------------------------- helpers
SPECS = [  # (prompt, image seed or None, max_tokens): the distinct requests of the load
    (f"Question {i}: {'what is in the picture' if i % 2 else 'name a colour'}?", i if i % 2 else None, 8 + i)
    for i in range(8)
]


def spec_body(spec: tuple, stream: bool) -> dict:
    prompt, seed, max_tokens = spec
    images = [] if seed is None else [data_uri(png_bytes(seed=seed))]
    return {"model": MODEL, "messages": user(prompt, *images), "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}


def answer(client: httpx.Client, body: dict) -> tuple[int, str | None, str | None]:
    """(status, text, finish_reason) of one chat request, streamed or not."""
    if not body["stream"]:
        r = client.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            return r.status_code, r.text, None
        choice = r.json()["choices"][0]
        return 200, choice["message"]["content"], choice["finish_reason"]
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode(), None
        events = sse_events(r)
    assert events[-1] == "[DONE]", events[-1]
    text = "".join(c["delta"].get("content", "") for e in events[:-1] for c in e["choices"])
    finish = [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    return 200, text, finish[0] if finish else None


@pytest.fixture(scope="module")
def alone(server) -> dict[int, tuple]:
    """Each distinct request's answer when it is the only one, computed one after the other."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        return {i: answer(client, spec_body(spec, stream=False)) for i, spec in enumerate(SPECS)}


def run_threads(targets: list, timeout: float = 60) -> None:
    errors: list[BaseException] = []

    def guarded(target) -> None:
        try:
            target()
        except BaseException as e:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout)
    assert not any(th.is_alive() for th in threads), "a client thread hung"
    if errors:
        raise errors[0]


def leftovers(engine) -> dict[str, int]:
    """Live KV caches (beyond those ``engine``'s prefix cache keeps), requests, handles, prompts, generations."""
    gc.collect()
    counts = collections.Counter(type(o) for o in gc.get_objects())
    kinds = (KVCache, _Request, RequestHandle, Prompt, Generation)
    return {kind.__name__: counts[kind] - (len(engine.prefixes.entries) if kind is KVCache else 0) for kind in kinds}


def assert_no_more_leftovers(engine, before: dict[str, int]) -> None:
    after = leftovers(engine)  # other tests' servers may still hold theirs: count what this test adds
    assert all(after[k] <= before[k] for k in before), (before, after)


def uncached_tensor_bytes(engine) -> int:
    """Bytes of the live tensors that are not in the engine's prefix or image-feature cache (the weights...)."""
    gc.collect()
    cached = {id(t) for _, cache in engine.prefixes.entries.values() for t in cache.k + cache.v}
    cached |= {id(f) for f in engine.features.entries.values()}
    return sum(o.nbytes for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and id(o) not in cached)


def settled_rss() -> int:
    """This process's resident bytes once garbage is collected and glibc has returned its free memory to the
    system (0 where that cannot be measured)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)


def raw_request(port: int, body: bytes, declared: int | None = None, receive_buffer: int | None = None,
                send: int | None = None) -> socket.socket:
    """A raw client: the headers (Content-Length ``declared``, default the body's length), then ``send`` bytes
    of the body (default all of it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", port))
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if declared is None else declared}\r\n\r\n")
    sock.sendall(head.encode() + body[:send])
    return sock


def read_response(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(TimeoutError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


# ---------------------------------------------------------------------------------------------- limits
def test_total_image_pixels_per_request(api):
    small = data_uri(png_bytes())  # 64x48 = 3,072 pixels
    ok = api.post("/v1/chat/completions", json={"messages": user("?", *[small] * 3), "max_tokens": 1})
    assert ok.status_code == 200, ok.text
    error = assert_error(api.post("/v1/chat/completions", json={"messages": user("?", *[small] * 4)}),
                         400, code="image_too_large", param="messages")
    assert f"{PIXELS_PER_REQUEST:,}" in error["message"] and "12,288" in error["message"]
    # one image over the per-image limit is refused from its header, before its pixels are decoded
    error = assert_error(api.post("/v1/chat/completions", json={"messages": user("?", data_uri(png_bytes(100, 95)))}),
                         400, code="image_too_large", param="messages")
    assert f"{PIXELS_PER_IMAGE:,}" in error["message"]


def test_max_tokens_is_clamped_to_the_context(server, api):
    """A huge max_tokens is accepted, and its KV cache is sized for the context, not for what was asked."""
    body = {"model": MODEL, "messages": user("Go on."), "max_tokens": 10**12, "temperature": 0, "stream": True}
    engine = server.vlm.engine
    with api.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        wait_until(lambda: '"content": "' in (line := next(lines)) and '"content": ""' not in line, 30, "a token")
        (request,) = list(engine._running)
        assert len(request.prompt.ids) + request.budget == server.vlm.context_length
        assert request.cache.capacity == server.vlm.context_length


def test_in_flight_bound_is_503_with_retry_after(server, api, monkeypatch):
    """Requests still sending their bodies count: the server holds at most max_batch + max_queue at once."""
    monkeypatch.setattr(server.app.state.settings, "max_queue", 2)
    monkeypatch.setattr(server.app.state.settings, "body_timeout", 30.0)
    limit = MAX_BATCH + 2
    stalled = [raw_request(server.port, b"{}", declared=100, send=1) for _ in range(limit)]
    try:
        wait_until(lambda: server.in_flight == limit, 5, "the stalled requests to be counted")
        r = api.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 1})
        error = assert_error(r, 503, code="server_overloaded")
        assert error["type"] == "overloaded_error" and int(r.headers["Retry-After"]) >= 1
        assert f"the limit is {limit}" in error["message"]
    finally:
        for sock in stalled:
            sock.close()
    wait_until(lambda: server.in_flight == 0, 5, "the closed requests to be released")
    assert api.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 1}).status_code == 200


def test_half_body_is_408_or_dropped(server, api):
    body = json.dumps(spec_body(SPECS[0], stream=False)).encode()
    closer = raw_request(server.port, body, declared=len(body) + 500)
    closer.close()  # gone half-way through its body
    staller = raw_request(server.port, body, declared=len(body) + 500)
    try:
        started = time.monotonic()
        reply = read_response(staller, timeout=10)  # the server answers, then closes the connection
        assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
        error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "request_timeout" and set(error) == {"message", "type", "param", "code"}
        assert 1.0 < time.monotonic() - started < 8
    finally:
        staller.close()
    wait_until(lambda: server.in_flight == 0, 5, "the half bodies to be released")
    assert answer(api, spec_body(SPECS[0], stream=False))[0] == 200


def test_slow_request_head_is_408_and_closed(server, api, monkeypatch):
    """A client that sends its request line and headers a byte at a time ("slowloris"), or connects and sends
    nothing, loses its connection at --header-timeout; a complete head followed by a pause, or a kept-alive
    connection idle between requests, does not."""
    protocol = server.server.config.http_protocol_class  # jvlm serve's, with --header-timeout as a class attribute
    assert protocol.header_timeout == server.app.state.settings.header_timeout == 30.0
    monkeypatch.setattr(protocol, "header_timeout", HEADER_TIMEOUT)
    trickler = socket.create_connection(("127.0.0.1", server.port))
    silent = socket.create_connection(("127.0.0.1", server.port))
    try:
        started = time.monotonic()
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Padding: y\r\n" * 1000
        trickler.settimeout(0.1)
        reply = b""
        for byte in head:  # a byte every 0.1 s and never the end of the headers: the server must give up
            if time.monotonic() - started > HEADER_TIMEOUT + 4:
                break
            try:
                trickler.sendall(bytes([byte]))
                chunk = trickler.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # reset: the server has closed
                break
            if not chunk:
                break
            reply += chunk
        with contextlib.suppress(OSError):
            reply += read_response(trickler, timeout=2)
        elapsed = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
        error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "request_timeout" and "headers" in error["message"]
        assert HEADER_TIMEOUT <= elapsed < HEADER_TIMEOUT + 4
        assert read_response(silent, timeout=5) == b""  # closed, not timed out
        assert time.monotonic() - started < HEADER_TIMEOUT + 4
    finally:
        trickler.close()
        silent.close()

    monkeypatch.setattr(server.app.state.settings, "body_timeout", 30.0)
    body = json.dumps(spec_body(SPECS[0], stream=False)).encode()
    paused = socket.create_connection(("127.0.0.1", server.port))
    try:
        paused.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                       b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        time.sleep(HEADER_TIMEOUT + 0.5)  # the head is complete: the body has --body-timeout
        paused.sendall(body)
        assert read_response(paused, timeout=30).startswith(b"HTTP/1.1 200 ")
    finally:
        paused.close()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert answer(client, spec_body(SPECS[1], stream=False))[0] == 200
        time.sleep(HEADER_TIMEOUT + 0.5)  # idle on a kept-alive connection (uvicorn's keep-alive is 5 s)
        assert answer(client, spec_body(SPECS[1], stream=False))[0] == 200
        assert client.get("/metrics").status_code == 200


def test_request_timeout_frees_a_queued_request_at_once(server, api, monkeypatch):
    vlm = server.vlm
    engine = vlm.engine
    prompt = vlm.prepare(user("Keep the batch busy."))
    busy = [vlm.submit(prompt, SamplingParams(max_new_tokens=4000)) for _ in range(MAX_BATCH)]
    try:
        wait_until(lambda: engine.num_running == MAX_BATCH, 10, "the batch to fill")
        monkeypatch.setattr(server.app.state.settings, "request_timeout", 0.5)
        r = api.post("/v1/chat/completions", json={"messages": user("Wait for me."), "max_tokens": 4})
        assert_error(r, 504, code="request_timeout")
        wait_until(lambda: engine.queue_depth == 0, 2, "the timed-out request to leave the queue")
        assert engine.num_running == MAX_BATCH  # ... while the batch is still full
    finally:
        for handle in busy:
            handle.cancel()
    wait_until(server.idle, 10, "the batch to be cancelled")


def test_file_urls_only_inside_the_allowed_directory(api, files):
    def request(url: str) -> httpx.Response:
        return api.post("/v1/chat/completions", json={"messages": user("?", url), "max_tokens": 1})

    inside = files / "images" / "cat.png"
    assert request(inside.as_uri()).status_code == 200
    escapes = [
        f"file://{files}/images/../secret.png",
        f"file://{files}/images/%2e%2e/secret.png",
        f"file://{urllib.parse.quote(str(files))}/images/%2E%2E%2Fsecret.png",
        (files / "images" / "link.png").as_uri(),  # a symlink pointing out of the directory
        (files / "secret.png").as_uri(),
        f"file://evil.example{inside}",  # a remote host
        str(inside),  # a plain path is never accepted by the server
    ]
    for url in escapes:
        assert_error(request(url), 400, code="invalid_image", param="messages")
    with pytest.raises(ImageError, match="file: URLs only inside"):
        make_image_loader(Settings())(inside.as_uri())  # no allowed directory: every file: URL refused
    with pytest.raises(ValidationError, match="not an existing directory"):
        Settings(allow_file_dir=files / "missing")


def test_limit_flags(files):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args([
        "--allow-file-dir", str(files), "--allowed-hosts", "10.0.0.0/8", "*.corp.example", "--allow-private-urls",
        "--max-image-bytes", "1000", "--max-image-pixels", "2000", "--max-total-image-pixels", "3000",
        "--request-timeout", "0", "--write-timeout", "5", "--body-timeout", "6", "--prefix-cache-bytes", "0",
        "--image-cache-bytes", "7"])
    settings = Settings(**{k: v for k, v in vars(args).items() if v is not None})
    assert settings.allow_file_dir == files and settings.allowed_hosts == ["10.0.0.0/8", "*.corp.example"]
    assert settings.allow_private_urls and settings.request_timeout == 0
    assert (settings.max_image_bytes, settings.max_image_pixels, settings.max_total_image_pixels) == (1000, 2000, 3000)
    assert (settings.write_timeout, settings.body_timeout, settings.prefix_cache_bytes,
            settings.image_cache_bytes) == (5, 6, 0, 7)
    defaults = Settings()
    assert defaults.request_timeout == 600 and defaults.max_in_flight == 16 + 64
    assert defaults.allow_file_dir is None and not defaults.allow_private_urls


# ---------------------------------------------------------------------------------------------- load
def test_32_clients_exact_and_nothing_leaks(server, alone):
    """Two bursts of 32 clients x 2 requests. The first also warms the thread pools and the allocator. After
    the second: no KV cache, prompt or request alive but what the prefix cache keeps (its byte budget is
    deliberate, retained memory), no more tensor memory outside the caches than before, RSS near where the first
    burst left it (loosely: the allocator keeps some of what the image preprocessing churns through)."""
    assert all(status == 200 for status, _, _ in alone.values()), alone
    engine = server.vlm.engine
    clients, rounds = 32, 2
    sizes: list[int] = []
    decode = engine._decode

    def recording_decode(batch):
        sizes.append(len(batch))
        return decode(batch)

    def burst(offset: int) -> None:
        results: list[tuple] = []
        barrier = threading.Barrier(clients)

        def client(i: int) -> None:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                barrier.wait(timeout=30)
                for k in range(rounds):
                    spec = (i * rounds + k + offset) % len(SPECS)
                    stream = (i + k) % 2 == 0
                    results.append((spec, stream, *answer(c, spec_body(SPECS[spec], stream))))

        run_threads([lambda i=i: client(i) for i in range(clients)], timeout=90)
        assert len(results) == clients * rounds
        assert not [r for r in results if r[2] != 200], [r for r in results if r[2] != 200][:3]
        for spec, stream, _, text, finish in results:
            assert (200, text, finish) == alone[spec], (spec, stream)
        assert {stream for _, stream, *_ in results} == {True, False}
        wait_until(server.idle, 10, "the load to drain")
        wait_until(lambda: not any(t.name == "jvlm-pump" for t in threading.enumerate()), 5, "pump threads to end")

    before = leftovers(engine)
    engine._decode = recording_decode
    try:
        burst(0)
        baseline, tensors = settled_rss(), uncached_tensor_bytes(engine)
        burst(1)
    finally:
        del engine._decode
    assert max(sizes) == MAX_BATCH  # the batch was full, so others waited in the queue
    assert_no_more_leftovers(engine, before)
    assert engine.prefixes.nbytes <= engine.prefixes.max_bytes
    assert uncached_tensor_bytes(engine) <= tensors
    samples = dict(line.rsplit(" ", 1) for line in httpx.get(server.url + "/metrics").text.splitlines()
                   if line and not line.startswith("#"))
    assert samples["jvlm_in_flight_requests"] == samples["jvlm_running_requests"] == samples["jvlm_queue_depth"] == "0"
    assert int(samples["jvlm_prefix_cache_entries"]) == len(engine.prefixes.entries) > 0
    assert int(samples["jvlm_prefix_cache_bytes"]) == engine.prefixes.nbytes
    assert int(samples["jvlm_prefix_cache_budget_bytes"]) == Settings().prefix_cache_bytes
    assert int(samples["jvlm_image_cache_entries"]) >= 4 and int(samples["jvlm_image_cache_bytes"]) > 0
    if baseline:
        growth = settled_rss() - baseline
        assert growth < 256 << 20, f"RSS grew by {growth / 2**20:.0f} MiB"  # one image request churns ~20 MiB


# ---------------------------------------------------------------------------------------------- faults
def test_engine_thread_survives_a_failing_step(server, api, alone, monkeypatch):
    """An unexpected error escaping a whole engine step fails the requests in that batch (500), not the thread
    every request waits on: the next request is served as usual."""
    engine = server.vlm.engine
    decode, failures = engine._decode, []

    def failing_once(batch):
        if not failures:
            failures.append(len(batch))
            raise RuntimeError("a bug in the step")
        return decode(batch)

    monkeypatch.setattr(engine, "_decode", failing_once)
    r = api.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 4})
    assert_error(r, 500, code="internal_error")
    assert failures and engine.running_in_background
    assert answer(api, spec_body(SPECS[2], stream=False)) == alone[2]


def test_hostile_clients_do_not_disturb_others(server, alone):
    """Normal clients run while others disconnect mid-stream, send half a body, or never read their stream;
    every normal answer is exact, and every hostile request's generation is cancelled and freed."""
    engine = server.vlm.engine
    finished: list[tuple[str, int, int]] = []  # (finish reason, tokens generated, budget)
    finish = engine._finish

    def recording_finish(r, reason, **kwargs):
        if r.finish_reason is None:
            finished.append((reason, len(r.generated), r.budget))
        return finish(r, reason, **kwargs)

    long = {"model": MODEL, "messages": user("Go on forever."), "max_tokens": 4000, "temperature": 0,
            "stream": True}
    never_read = json.dumps({**long, "logprobs": True, "top_logprobs": 20}).encode()
    results: list[tuple] = []
    sockets: list[socket.socket] = []

    def normal(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for k in range(2):
                spec = (i + k) % len(SPECS)
                results.append((spec, *answer(c, spec_body(SPECS[spec], stream=(i + k) % 2 == 0))))

    def disconnect() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/v1/chat/completions",
                                                                          json=long) as r:
            seen = 0
            for line in r.iter_lines():
                seen += '"content"' in line
                if seen >= 3:
                    break  # leaves with the stream half-read

    def half_body(close: bool) -> None:
        body = json.dumps(long).encode()
        sock = raw_request(server.port, body, declared=len(body) + 100)
        if close:
            sock.close()
        else:
            sockets.append(sock)

    def no_reader() -> None:
        sockets.append(raw_request(server.port, never_read, receive_buffer=4096))

    before = leftovers(engine)
    engine._finish = recording_finish
    try:
        run_threads([*(lambda i=i: normal(i) for i in range(8)), *(disconnect for _ in range(4)),
                     *(lambda c=c: half_body(c) for c in (True, True, False, False)), no_reader, no_reader])
        assert len(results) == 16
        for spec, status, text, reason in results:
            assert (status, text, reason) == alone[spec], spec
        wait_until(server.idle, 20, "the hostile requests to be released")
    finally:
        del engine._finish
        for sock in sockets:
            sock.close()
    hostile = [f for f in finished if f[2] > 3000]
    assert len(hostile) == 6  # 4 disconnected + 2 never read (half bodies never reach the engine)
    assert all(reason == "cancelled" and generated < budget for reason, generated, budget in hostile), hostile
    assert_no_more_leftovers(engine, before)


def test_failing_requests_mid_batch_fail_alone(server, monkeypatch):
    """While image and text requests stream, one request's image fails to decode (400), another's fails inside
    the engine during its prefill (500), a third fails in a decode step it shares with the others (500): the
    others finish with their exact answers."""
    engine = server.vlm.engine
    image_features, accept = engine._image_features, engine._accept
    poison = 12345  # the max_pixels of the request whose image the engine fails on, the top_k of the third
    batch_at_failure: dict[str, int] = {}

    def failing_image_features(prompt, start):
        if any(im.key[2] == poison for im in prompt.images):
            batch_at_failure["prefill"] = engine.num_running  # the failing request is in the batch, with others
            raise RuntimeError("the vision tower failed")
        return image_features(prompt, start)

    def failing_accept(r, logits):
        if r.params.top_k == poison and r.generated:  # its second token: in a batched decode step
            batch_at_failure["decode"] = engine.num_running
            raise RuntimeError("the sampler failed")
        return accept(r, logits)

    specs = {i: (prompt, seed, 48) for i, (prompt, seed, _) in enumerate(SPECS) if i in (0, 1, 3, 4, 5, 7)}
    with httpx.Client(base_url=server.url, timeout=60) as c:  # long enough to overlap the failing requests
        alone = {i: answer(c, spec_body(spec, stream=False)) for i, spec in specs.items()}
    monkeypatch.setattr(engine, "_image_features", failing_image_features)
    monkeypatch.setattr(engine, "_accept", failing_accept)
    results: list[tuple] = []
    first_token = threading.Event()
    truncated = png_bytes(seed=9)[:300]

    def normal(spec: int) -> None:
        body = spec_body(specs[spec], stream=True)
        with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/v1/chat/completions",
                                                                          json=body) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if '"content": "' in line and '"content": ""' not in line:
                    first_token.set()
        events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        results.append((spec, "".join(c["delta"].get("content", "") for e in events for c in e["choices"])))

    def bad(kind: str) -> None:
        assert first_token.wait(30)
        with httpx.Client(base_url=server.url, timeout=60) as c:
            if kind == "image":
                r = c.post("/v1/chat/completions", json={"messages": user("?", data_uri(truncated)), "max_tokens": 4})
                assert_error(r, 400, code="invalid_image", param="messages")
                return
            if kind == "prefill":
                r = c.post("/v1/chat/completions", json={"messages": user("?", data_uri(png_bytes(seed=3))),
                                                         "max_tokens": 4, "max_pixels": poison})
            else:
                r = c.post("/v1/chat/completions", json={"messages": user("Hello?"), "max_tokens": 8, "top_k": poison})
            error = assert_error(r, 500, code="internal_error")
            assert error["type"] == "server_error" and "failed" not in error["message"]  # details are logged only

    failing = [lambda k=k: bad(k) for k in ("image", "prefill", "decode")]
    run_threads([*(lambda s=s: normal(s) for s in specs), *failing])
    assert sorted(spec for spec, _ in results) == sorted(specs)
    assert set(batch_at_failure) == {"prefill", "decode"} and min(batch_at_failure.values()) >= 2, batch_at_failure
    for spec, text in results:
        assert text == alone[spec][1], spec
