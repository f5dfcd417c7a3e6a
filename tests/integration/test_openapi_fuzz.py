"""Schemathesis against the in-process app: no 5xx, and no status a route does not document.

The schema is the one the app serves at /openapi.json. Every operation in it gets valid and
invalid requests, once with an admin key and once with a tenant's user key, on a throwaway home
holding an ONNX model and a tiny Llama. Generated model names, versions and upload file names
are swapped for real ones part of the time (the hooks below), so that requests get past the
lookup and into the models and importers. The run is time-boxed (``MAX_EXAMPLES`` per operation
and role, a pytest timeout) and derandomized, so CI sends the same requests every time;
``FUZZ_MAX_EXAMPLES=300`` runs a deeper search locally.

Schemathesis starts the app's lifespan on its first request and its pytest plugin ends it
after the test.
"""

from __future__ import annotations

import json
import os

import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from maas.api.app import build_app
from maas.auth.principal import Role
from maas.config import Settings
from tests.conftest import suite_settings
from tests.fixtures import make_onnx, make_tiny_llama
from tests.integration.conftest import bearer, key_maker, tenant_maker

MODELS = ("fuzz-linear", "fuzz-chat")
ONNX_INPUT = "x"
REAL_VALUES = {
    "model": MODELS,
    "name": MODELS,
    "version": (1,),
    "filename": ("model.onnx", "model.gguf", "model.tar.gz", "model.zip"),
}
"""Parameters whose generated values hardly ever name something real, and real ones."""

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "20"))
"""Requests per operation and role, valid and invalid."""
FUZZ_CONFIG = {
    "checks": {
        "enabled": False,
        "not_a_server_error": {"enabled": True},
        "status_code_conformance": {"enabled": True},
    },
    "request-timeout": 30,
}


@pytest.fixture(scope="module")
def fuzz_home(tmp_path_factory):
    """A home with the two models (shared) and an admin and a user key."""
    folder = tmp_path_factory.mktemp("fuzz")
    settings = _settings(folder / "maas-home")
    with TestClient(build_app(settings)) as client:
        registry = client.app.state.registry
        registry.import_model(make_onnx(folder / "linear.onnx"), MODELS[0])
        registry.import_model(make_tiny_llama(folder / "llama"), MODELS[1])
        tenant_maker(client)("acme")
        make_key = key_maker(client)
        keys = {"admin": make_key(Role.admin), "user": make_key(Role.user, tenant="acme")}
    threads = torch.get_num_threads()
    yield settings, keys
    torch.set_num_threads(threads)  # the engine set it to inference_threads


def _settings(home) -> Settings:
    """The suite's settings (decode steps eager) with cheap generation and a small upload
    limit."""
    return suite_settings(
        home,
        inference_threads=1,
        llm_engine_process=False,
        llm_max_model_len=64,
        llm_max_sequences=4,
        max_upload_bytes=64 * 1024,
        request_timeout_s=20,
    )


@pytest.fixture(params=["admin", "user"])
def api_schema(request, fuzz_home):
    """The schema a fresh app on the fuzz home serves, read and fuzzed with one role's key.
    Schemathesis runs the app's lifespan, and ends it after the test."""
    settings, keys = fuzz_home
    headers = bearer(keys[request.param])
    config = SchemathesisConfig.from_dict({**FUZZ_CONFIG, "headers": headers})
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", build_app(settings), config=config, headers=headers
    )
    schema.hook("flatmap_path_parameters")(_real_values)
    schema.hook("flatmap_query")(_real_values)
    schema.hook("flatmap_body")(_real_values_in_body)
    return schema


def _real_values(context, parameters: dict | None) -> st.SearchStrategy:
    """The generated values, or real ones; never on DELETE (the fuzz must not remove the
    models the other operations run)."""
    if not isinstance(parameters, dict) or context.operation.method.upper() == "DELETE":
        return st.just(parameters)
    return st.fixed_dictionaries(
        {
            name: st.sampled_from([value, *REAL_VALUES.get(name, ())])
            for name, value in parameters.items()
        }
    )


def _real_values_in_body(context, body) -> st.SearchStrategy:
    """The generated body, or one naming a real model, or the ONNX model's input."""
    if not isinstance(body, dict):
        return st.just(body)
    variants = [body, *({**body, "model": model} for model in MODELS if "model" in body)]
    if isinstance(body.get("inputs"), list):
        named = [
            {**item, "name": ONNX_INPUT} if isinstance(item, dict) else item
            for item in body["inputs"]
        ]
        variants.append({**body, "inputs": named})
    return st.sampled_from(variants)


@pytest.mark.timeout(120)  # the deadline; a role takes about 7s on two busy cores
def test_no_server_error_and_every_status_documented(api_schema):
    failures = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        try:
            _fuzz(operation)
        except Exception as failure:  # schemathesis' FailureGroup, or hypothesis' own error
            failures[operation.label] = str(failure)
    assert not failures, "\n\n".join(f"{label}: {text}" for label, text in failures.items())


def _fuzz(operation) -> None:
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,  # the same requests on every run
        phases=[Phase.generate],  # no shrinking: a failure is reported as found, in time
        deadline=None,  # per request: the pytest timeout bounds the whole run instead
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def run(case) -> None:
        case.call_and_validate()

    run()


SURROGATE = "\ud800"  # half of a UTF-16 surrogate pair: JSON can escape it alone
FINDINGS = {
    "a text-generation model on the v2 infer route": (
        "/v2/models/fuzz-chat/infer",
        {"inputs": []},
        "fuzz-chat:1 is a chat model; send it to /v1/chat/completions or /v1/completions",
    ),
    "half a surrogate pair in a chat message": (
        "/v1/chat/completions",
        {"model": "fuzz-chat", "messages": [{"role": "user", "content": f"a{SURROGATE}"}]},
        "the body is not valid JSON: a string holds half of a surrogate pair",
    ),
    "half a surrogate pair in a v2 input name": (
        "/v2/models/fuzz-linear/infer",
        {"inputs": [{"name": SURROGATE, "shape": [1], "datatype": "BYTES", "data": ["a"]}]},
        "half of a surrogate pair",
    ),
    "a server path too long to look at": (
        "/api/v1/models",
        {"name": "too-long", "path": "a" * 5000},
        "cannot read aaaa",
    ),
}
"""Requests that answered 500 before (found by the fuzz, or by probing around what it found),
with what they answer now: a 400 that says why."""


@pytest.fixture(scope="module")
def admin_client(fuzz_home):
    settings, keys = fuzz_home
    with TestClient(build_app(settings)) as client:
        client.headers.update(bearer(keys["admin"]))
        yield client


@pytest.mark.parametrize(("path", "body", "answer"), FINDINGS.values(), ids=list(FINDINGS))
def test_what_the_fuzz_found_is_a_400(admin_client, path, body, answer):
    content = json.dumps(body)  # escapes a lone surrogate as \\ud800, as a client would
    response = admin_client.post(
        path, content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert answer in (error if path.startswith("/v2") else error["message"])
