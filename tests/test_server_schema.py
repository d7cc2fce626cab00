"""Schema fuzzing of the served OpenAPI with schemathesis: every operation of a live server's ``/openapi.json``,
with data that fits the schema and data that breaks it (bounded: 25 examples each, derandomized so that a run
is reproducible). No 5xx; every response (streams event by event) matches its documented status, content type
and schema; data that breaks the schema is refused; every error body has OpenAI's shape (the cold-start 503 is
the one documented exception, and the server is ready here).
"""

from __future__ import annotations

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from jvlm.server import Settings, create_app
from jvlm.testing import write_tiny_checkpoint
from test_server import LiveServer

POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# (method, path, mode): only the chat route takes input, so only it can be sent data that breaks the schema
RUNS = [("GET", "/health", POSITIVE), ("GET", "/ready", POSITIVE), ("GET", "/metrics", POSITIVE),
        ("GET", "/v1/models", POSITIVE), ("POST", "/v1/chat/completions", POSITIVE),
        ("POST", "/v1/chat/completions", NEGATIVE)]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]  # the last: data that breaks the schema is refused (e.g. no "5" for 5)
EXAMPLES = 25


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A live server on a 128-token model, so any generation the fuzzer asks for stays short."""
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("ctx128") / "tiny-128", max_sequence_length=128)
    settings = Settings(model=str(ckpt), image_fetch_timeout=1.0, request_timeout=60, log_level="critical")
    with LiveServer(create_app(settings)) as live:
        live.wait_ready()
        yield live, schemathesis.openapi.from_url(live.url + "/openapi.json")


def assert_openai_error(response: requests.Response) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error


def test_the_schema_documents_openai_errors_not_422(served):
    live, _ = served
    spec = requests.get(live.url + "/openapi.json", timeout=10).json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in chat and {"400", "401", "404", "408", "413", "500", "503", "504"} <= set(chat)
    assert chat["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]


@pytest.mark.parametrize(("method", "path", "mode"), RUNS, ids=[f"{m} {p} {g.value}" for m, p, g in RUNS])
def test_fuzz(served, method, path, mode):
    live, schema = served
    operation = schema[path][method]
    statuses: list[int] = []

    with requests.Session() as session:
        @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                             phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @hypothesis.given(case=operation.as_strategy(mode))
        def fuzz(case):
            response = case.call(base_url=live.url, session=session, timeout=60)
            statuses.append(response.status_code)
            case.validate_response(response, checks=CHECKS)
            if response.status_code >= 400:
                assert_openai_error(response)

        fuzz()
    assert statuses and max(statuses) < 500
    engine = live.vlm.engine
    assert engine.num_running == 0 and engine.queue_depth == 0
