"""Server life cycle and limits: cold start (503 while loading), API keys, the context limit, the
bounded queue, the request timeout, and graceful shutdown of a real ``python -m jvlm.server`` on SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import jvlm
from jvlm.server import Settings, add_serve_arguments, create_app, serve_main
from jvlm.testing import write_tiny_checkpoint
from test_server import MODEL, LiveServer, assert_error, data_uri, png_bytes, sse_events, user

KEY = "sekret-key"


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- cold start
def test_503_while_loading_then_ready(tiny_dir):
    release = threading.Event()

    def slow_loader():
        assert release.wait(30)
        return jvlm.load(tiny_dir)

    settings = Settings(model=str(tiny_dir), request_timeout=0.5, log_level="warning")
    with LiveServer(create_app(settings, loader=slow_loader)) as live, httpx.Client(base_url=live.url) as c:
        assert c.get("/health").status_code == 200  # the port is open at once
        assert c.get("/ready").status_code == 503
        for r in (c.get("/v1/models"),
                  c.post("/v1/chat/completions", json={"model": MODEL, "messages": user("hi")})):
            assert r.status_code == 503
            body = r.json()
            assert set(body) == {"error"} and set(body["error"]) == {"message", "code"}
            assert body["error"]["code"] == 503
            assert body["error"]["message"].startswith("Model is loading, please retry in 30-60 seconds. ")
            assert int(r.headers["Retry-After"]) > 0
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            client.models.list()
        assert "jvlm_model_ready 0" in c.get("/metrics").text

        release.set()
        live.wait_ready()
        assert c.get("/v1/models").status_code == 200
        assert live.vlm.engine.stats.forward_passes >= 1  # the warm-up ran before /ready said yes

        # request_timeout (0.5 s here) cancels a long generation: 504, or an error event when streaming
        body = {"model": MODEL, "messages": user("Go on."), "max_tokens": 4000}
        assert_error(c.post("/v1/chat/completions", json=body, timeout=30), 504, code="request_timeout")
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
            events = sse_events(r)
        assert events[-1]["error"]["code"] == "request_timeout"
        wait_until(lambda: live.vlm.engine.num_running == 0, 5, "the timed-out generation to stop")


def test_failed_load_is_reported(tiny_dir):
    def broken_loader():
        raise jvlm.CheckpointError("config.json is missing")

    with LiveServer(create_app(Settings(model="broken"), loader=broken_loader)) as live, httpx.Client(
            base_url=live.url) as c:
        wait_until(lambda: live.app.state.host.state == "failed", 10, "the load to fail")
        assert c.get("/health").json()["status"] == "failed"  # a liveness probe restarts the process
        assert c.get("/ready").status_code == 503
        error = assert_error(c.get("/v1/models"), 503, code="model_load_failed")
        assert "config.json is missing" in error["message"]


def test_serve_main_exits_1_when_the_model_cannot_load(tmp_path, capsys, caplog):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["-m", str(tmp_path / "missing"), "--port", "0", "--log-level", "error"])
    assert serve_main(args) == 1
    failure = [r for r in caplog.records if "loading model" in r.getMessage()]
    assert failure and failure[0].exc_info is None  # a typed error is one line, not a traceback
    assert serve_main(parser.parse_args(["--max-batch", "0"])) == 2  # invalid settings
    assert "invalid settings: --max-batch: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert serve_main(parser.parse_args(["--threads", "0"])) == 2
    assert "invalid settings: --threads: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert serve_main(parser.parse_args(["--allowed-hosts", "10.0.0.0/33"])) == 2  # not a network: no traceback
    assert "invalid settings: --allowed-hosts: Value error, UrlPolicy.allowed_hosts entry '10.0.0.0/33' is not a " \
           "valid network" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- a strict server
@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """An API key, a 512-token context, one decode slot and one waiting slot."""
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("ctx512") / "tiny-512", max_sequence_length=512)
    settings = Settings(model=str(ckpt), api_key=KEY, max_batch=1, max_queue=1, log_level="warning")
    with LiveServer(create_app(settings)) as live:
        live.wait_ready()
        yield live


@pytest.fixture
def authed(strict):
    with httpx.Client(base_url=strict.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


def test_api_key(strict):
    body = {"model": MODEL, "messages": user("hi"), "max_tokens": 1}
    with httpx.Client(base_url=strict.url, timeout=30) as c:
        assert_error(c.post("/v1/chat/completions", json=body), 401, code="invalid_api_key")
        wrong = c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, code="invalid_api_key")
        assert_error(c.get("/v1/models", headers={"Authorization": KEY}), 401)  # no "Bearer"
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        assert c.get("/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=strict.url + "/v1", api_key="nope", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=strict.url + "/v1", api_key=KEY, max_retries=0)
    assert ok.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=1).usage.completion_tokens == 1


def test_prompt_over_the_context_is_400(authed):
    big = data_uri(png_bytes(900, 900))
    r = authed.post("/v1/chat/completions", json={"model": MODEL, "messages": user("Describe.", big)})
    error = assert_error(r, 400, code="context_length_exceeded", param="messages")
    assert "512" in error["message"]
    # one crop of the same image fits
    fits = authed.post("/v1/chat/completions",
                       json={"model": MODEL, "messages": user("Describe.", big), "max_crops": 1, "max_tokens": 1})
    assert fits.status_code == 200, fits.text


def test_private_image_urls_refused_by_default(authed, strict):
    r = authed.post("/v1/chat/completions", json={"model": MODEL, "messages": user("?", strict.url + "/x.png")})
    assert_error(r, 400, code="image_fetch_failed", param="messages")


def test_full_queue_is_503(strict, authed):
    engine = strict.vlm.engine
    body = {"model": MODEL, "messages": user("Go on."), "max_tokens": 400, "temperature": 0, "stream": True}
    with authed.stream("POST", "/v1/chat/completions", json=body) as running:
        lines = running.iter_lines()
        wait_until(lambda: '"content": "' in next(lines) and engine.num_running == 1, 30, "the first request to run")
        with authed.stream("POST", "/v1/chat/completions", json=body) as waiting:
            assert waiting.status_code == 200
            wait_until(lambda: engine.queue_depth == 1, 10, "the second request to queue")
            r = authed.post("/v1/chat/completions", json={**body, "stream": False})
            error = assert_error(r, 503, code="server_overloaded")
            assert error["type"] == "overloaded_error" and int(r.headers["Retry-After"]) >= 1
    wait_until(lambda: engine.num_running == 0 and engine.queue_depth == 0, 10, "both requests to be cancelled")


# ---------------------------------------------------------------------------------------------- SIGTERM
def start_subprocess_server(tiny_dir, *flags: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jvlm.server", "--model", str(tiny_dir), "--port", str(port),
         "--log-level", "warning", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "JVLM_API_KEY": ""},
    )

    def ready() -> bool:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            return httpx.get(url + "/ready").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 60, "the subprocess server to be ready")
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_sigterm_finishes_in_flight_requests_and_exits_0(tiny_dir):
    proc, url = start_subprocess_server(tiny_dir, "--shutdown-timeout", "20")
    try:
        body = {"model": MODEL, "messages": user("Count."), "max_tokens": 40, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            wait_until(lambda: '"content": "' in next(lines), 30, "the first token")
            proc.send_signal(signal.SIGTERM)
            rest = [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
                    for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health")
    finally:
        stop(proc)


def test_sigterm_past_the_shutdown_timeout_answers_503(tiny_dir):
    """Requests still generating at the deadline get jvlm's 503 (a final error event on a stream), not a cut
    connection or a bare 500."""
    proc, url = start_subprocess_server(tiny_dir, "--shutdown-timeout", "1")
    try:
        body = {"model": MODEL, "messages": user("Count."), "max_tokens": 7000, "temperature": 0}
        answers = {}
        plain = threading.Thread(target=lambda: answers.update(
            plain=httpx.post(url + "/v1/chat/completions", json=body, timeout=60)))
        plain.start()
        with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/chat/completions",
                                                      json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            wait_until(lambda: '"content": "' in next(lines), 30, "the first token")
            proc.send_signal(signal.SIGTERM)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        plain.join(60)
        assert_error(answers["plain"], 503, code="cancelled")
        assert json.loads(events[-1])["error"]["code"] == "cancelled"
        assert proc.wait(30) == 0
    finally:
        stop(proc)
