"""Every route is authenticated, and each role gets exactly the status this table says."""

from __future__ import annotations

import base64

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from maas.api import governance, metrics
from maas.api.app import build_app
from maas.api.hardening import StrictJSONRoute
from tests.conftest import home_with_database, suite_settings
from tests.fixtures import make_png
from tests.integration.conftest import World, key_maker, tenant_maker

# the console's page shells hold no data: a browser following a link sends no key, so each
# shell's script loads its view (below, behind the API's roles) with the key as a header
PUBLIC = {
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/ui"),
    ("GET", "/ui/{page}"),
}

ROLES = ("none", "bad", "user", "maintainer", "admin")
INFER = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
CHAT = {"model": "acme-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
PREDICT = {"instances": [{"b64": base64.b64encode(make_png()).decode()}]}

# (method, route template) -> (concrete request, {role: expected status})
# Keys are acme's (user, maintainer) and the platform admin's; objects are acme's.
ALL = dict.fromkeys(ROLES)
ANY_KEY = {"none": 401, "bad": 401, "user": 200, "maintainer": 200, "admin": 200}
MAINTAINER = {"none": 401, "bad": 401, "user": 403, "maintainer": 200, "admin": 200}


def cells(expected: dict[str, int], **changes: int) -> dict[str, int]:
    return {**expected, **changes}


MATRIX = {
    ("GET", "/v2/health/live"): (("GET", "/v2/health/live", None), dict.fromkeys(ROLES, 200)),
    ("GET", "/v2/health/ready"): (("GET", "/v2/health/ready", None), dict.fromkeys(ROLES, 200)),
    ("GET", "/v2"): (("GET", "/v2", None), ANY_KEY),
    ("GET", "/v2/models/{model}"): (("GET", "/v2/models/acme-model", None), ANY_KEY),
    ("GET", "/v2/models/{model}/versions/{version}"): (
        ("GET", "/v2/models/acme-model/versions/2", None),
        ANY_KEY,
    ),
    # not ready (no runtime loads models yet) is 400 in the v2 protocol
    ("GET", "/v2/models/{model}/ready"): (
        ("GET", "/v2/models/acme-model/ready", None),
        cells(ANY_KEY, user=400, maintainer=400, admin=400),
    ),
    ("GET", "/v2/models/{model}/versions/{version}/ready"): (
        ("GET", "/v2/models/acme-model/versions/1/ready", None),
        cells(ANY_KEY, user=400, maintainer=400, admin=400),
    ),
    ("GET", "/v1/models"): (("GET", "/v1/models", None), ANY_KEY),
    ("GET", "/v1/models/{model}"): (("GET", "/v1/models/acme-model@staging", None), ANY_KEY),
    ("GET", "/api/v1/models"): (("GET", "/api/v1/models", None), MAINTAINER),
    ("POST", "/api/v1/models"): (
        ("POST", "/api/v1/models", {"name": "by-path", "path": "{gguf}"}),
        cells(MAINTAINER, maintainer=403, admin=201),
    ),
    ("POST", "/api/v1/models/{name}/versions/upload"): (
        ("POST", "/api/v1/models/acme-model/versions/upload?filename=m.gguf", b"{gguf-bytes}"),
        cells(MAINTAINER, maintainer=201, admin=201),
    ),
    ("GET", "/api/v1/models/{name}"): (("GET", "/api/v1/models/acme-model", None), MAINTAINER),
    ("DELETE", "/api/v1/models/{name}"): (
        ("DELETE", "/api/v1/models/acme-model", None),
        cells(MAINTAINER, maintainer=204, admin=204),
    ),
    ("GET", "/api/v1/models/{name}/versions"): (
        ("GET", "/api/v1/models/acme-model/versions", None),
        MAINTAINER,
    ),
    ("GET", "/api/v1/models/{name}/versions/{version}"): (
        ("GET", "/api/v1/models/acme-model/versions/1", None),
        MAINTAINER,
    ),
    # past the role check: acme-model:1 was not made by an optimization
    ("GET", "/api/v1/models/{name}/versions/{version}/report"): (
        ("GET", "/api/v1/models/acme-model/versions/1/report", None),
        cells(MAINTAINER, maintainer=404, admin=404),
    ),
    ("DELETE", "/api/v1/models/{name}/versions/{version}"): (
        ("DELETE", "/api/v1/models/acme-model/versions/2", None),
        cells(MAINTAINER, maintainer=204, admin=204),
    ),
    ("PUT", "/api/v1/models/{name}/aliases/{alias}"): (
        ("PUT", "/api/v1/models/acme-model/aliases/production", {"version": 2}),
        MAINTAINER,
    ),
    ("DELETE", "/api/v1/models/{name}/aliases/{alias}"): (
        ("DELETE", "/api/v1/models/acme-model/aliases/staging", None),
        cells(MAINTAINER, maintainer=204, admin=204),
    ),
    ("POST", "/api/v1/tenants"): (
        ("POST", "/api/v1/tenants", {"name": "initech", "industry": "finance"}),
        cells(MAINTAINER, maintainer=403, admin=201),
    ),
    ("GET", "/api/v1/tenants"): (("GET", "/api/v1/tenants", None), MAINTAINER),
    ("GET", "/api/v1/tenants/{name}"): (("GET", "/api/v1/tenants/acme", None), MAINTAINER),
    ("POST", "/api/v1/keys"): (
        ("POST", "/api/v1/keys", {"name": "new", "role": "user", "tenant": "acme"}),
        cells(MAINTAINER, maintainer=201, admin=201),
    ),
    ("GET", "/api/v1/keys"): (("GET", "/api/v1/keys", None), MAINTAINER),
    ("GET", "/api/v1/keys/{key_id}"): (("GET", "/api/v1/keys/{user_key_id}", None), MAINTAINER),
    ("DELETE", "/api/v1/keys/{key_id}"): (
        ("DELETE", "/api/v1/keys/{user_key_id}", None),
        MAINTAINER,
    ),
    ("GET", "/api/v1/usage"): (("GET", "/api/v1/usage", None), ANY_KEY),
    ("GET", "/api/v1/analytics/adoption"): (
        ("GET", "/api/v1/analytics/adoption", None),
        MAINTAINER,
    ),
    # nobody in energy has made a request: past the role check, nothing to forecast
    ("GET", "/api/v1/analytics/forecast"): (
        ("GET", "/api/v1/analytics/forecast?industry=energy", None),
        cells(MAINTAINER, maintainer=404, admin=404),
    ),
    ("GET", "/api/v1/analytics/potentials"): (
        ("GET", "/api/v1/analytics/potentials", None),
        MAINTAINER,
    ),
    ("GET", "/api/v1/analytics/costs"): (("GET", "/api/v1/analytics/costs", None), MAINTAINER),
    ("GET", "/api/v1/analytics/prices"): (("GET", "/api/v1/analytics/prices", None), MAINTAINER),
    ("PUT", "/api/v1/analytics/prices/{model}"): (
        ("PUT", "/api/v1/analytics/prices/acme-model", {"prompt_per_1k": 0.5}),
        cells(MAINTAINER, maintainer=403, admin=200),
    ),
    ("PUT", "/api/v1/analytics/potentials/{industry}"): (
        ("PUT", "/api/v1/analytics/potentials/retail", {"potential": 120}),
        cells(MAINTAINER, maintainer=403, admin=200),
    ),
    ("GET", "/ui"): (("GET", "/ui", None), dict.fromkeys(ROLES, 200)),
    ("GET", "/ui/{page}"): (("GET", "/ui/access", None), dict.fromkeys(ROLES, 200)),
    ("GET", "/ui/views/nav"): (("GET", "/ui/views/nav", None), ANY_KEY),
    ("GET", "/ui/views/models"): (("GET", "/ui/views/models", None), MAINTAINER),
    ("GET", "/ui/views/jobs"): (("GET", "/ui/views/jobs", None), MAINTAINER),
    ("GET", "/ui/views/usage"): (("GET", "/ui/views/usage", None), ANY_KEY),
    ("GET", "/ui/views/adoption"): (("GET", "/ui/views/adoption", None), MAINTAINER),
    ("GET", "/ui/views/access"): (
        ("GET", "/ui/views/access", None),
        cells(MAINTAINER, maintainer=403),
    ),
    ("GET", "/ui/views/chat"): (("GET", "/ui/views/chat", None), ANY_KEY),
    ("GET", "/api/v1/analytics/series"): (("GET", "/api/v1/analytics/series", None), MAINTAINER),
    ("POST", "/api/v1/analytics/series"): (
        ("POST", "/api/v1/analytics/series", "{csv}"),
        cells(MAINTAINER, maintainer=403, admin=201),
    ),
    ("POST", "/v1/files"): (("POST", "/v1/files", "{upload}"), MAINTAINER),
    ("GET", "/v1/files"): (("GET", "/v1/files", None), MAINTAINER),
    ("GET", "/v1/files/{file_id}"): (("GET", "/v1/files/{file_id}", None), MAINTAINER),
    ("GET", "/v1/files/{file_id}/content"): (
        ("GET", "/v1/files/{file_id}/content", None),
        MAINTAINER,
    ),
    ("DELETE", "/v1/files/{file_id}"): (("DELETE", "/v1/files/{file_id}", None), MAINTAINER),
    # no kind of job is installed in this app: past the role check, the kind is refused
    ("POST", "/api/v1/jobs"): (
        ("POST", "/api/v1/jobs", {"kind": "train", "params": {}}),
        cells(MAINTAINER, maintainer=400, admin=400),
    ),
    ("GET", "/api/v1/jobs"): (("GET", "/api/v1/jobs", None), MAINTAINER),
    ("GET", "/api/v1/jobs/{job_id}"): (("GET", "/api/v1/jobs/{job_id}", None), MAINTAINER),
    ("GET", "/api/v1/jobs/{job_id}/events"): (
        ("GET", "/api/v1/jobs/{job_id}/events", None),
        MAINTAINER,
    ),
    ("POST", "/api/v1/jobs/{job_id}/cancel"): (
        ("POST", "/api/v1/jobs/{job_id}/cancel", None),
        MAINTAINER,
    ),
    # acme's maintainer queues it; the admin's tenant does not own acme's model
    ("POST", "/api/v1/optimizations"): (
        ("POST", "/api/v1/optimizations", {"model": "acme-cnn", "recipe": "prune 0.5"}),
        cells(MAINTAINER, maintainer=201, admin=404),
    ),
    # the admin's own tenant holds no such file: past the role check, it is refused
    ("POST", "/v1/fine_tuning/jobs"): (
        ("POST", "/v1/fine_tuning/jobs", {"model": "acme-chat", "training_file": "{file_id}"}),
        cells(MAINTAINER, admin=400),
    ),
    ("GET", "/v1/fine_tuning/jobs"): (("GET", "/v1/fine_tuning/jobs", None), MAINTAINER),
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}"): (
        ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}", None),
        MAINTAINER,
    ),
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel"): (
        ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel", None),
        MAINTAINER,
    ),
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events"): (
        ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events", None),
        MAINTAINER,
    ),
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"): (
        ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints", None),
        MAINTAINER,
    ),
    ("GET", "/metrics"): (("GET", "/metrics", None), cells(MAINTAINER, maintainer=403)),
    ("GET", "/openapi.json"): (("GET", "/openapi.json", None), ANY_KEY),
    ("POST", "/v2/models/{model}/infer"): (
        ("POST", "/v2/models/acme-linear/infer", INFER),
        ANY_KEY,
    ),
    ("POST", "/v2/models/{model}/versions/{version}/infer"): (
        ("POST", "/v2/models/acme-linear/versions/1/infer", INFER),
        ANY_KEY,
    ),
    ("POST", "/v1/models/{model}:predict"): (
        ("POST", "/v1/models/acme-cnn:predict", PREDICT),
        ANY_KEY,
    ),
    ("POST", "/v1/embeddings"): (
        ("POST", "/v1/embeddings", {"model": "acme-embedder", "input": "the cat"}),
        ANY_KEY,
    ),
    ("POST", "/v2/repository/index"): (("POST", "/v2/repository/index", None), MAINTAINER),
    ("POST", "/v2/repository/models/{model}/load"): (
        ("POST", "/v2/repository/models/acme-linear/load", None),
        MAINTAINER,
    ),
    ("POST", "/v2/repository/models/{model}/unload"): (
        ("POST", "/v2/repository/models/acme-linear/unload", None),
        MAINTAINER,
    ),
    ("PATCH", "/api/v1/models/{name}"): (
        ("PATCH", "/api/v1/models/acme-linear", {"serving": {"max_batch_size": 4}}),
        MAINTAINER,
    ),
    ("POST", "/api/v1/models/{name}/versions/{version}/load"): (
        ("POST", "/api/v1/models/acme-linear/versions/1/load", None),
        MAINTAINER,
    ),
    ("POST", "/api/v1/models/{name}/versions/{version}/unload"): (
        ("POST", "/api/v1/models/acme-linear/versions/1/unload", None),
        MAINTAINER,
    ),
    ("GET", "/api/v1/deployments"): (("GET", "/api/v1/deployments", None), MAINTAINER),
    ("POST", "/v1/chat/completions"): (("POST", "/v1/chat/completions", CHAT), ANY_KEY),
    ("POST", "/v1/completions"): (
        ("POST", "/v1/completions", {"model": "acme-chat", "prompt": "hi", "max_tokens": 2}),
        ANY_KEY,
    ),
}


def _route_contexts(app):
    """Every API route, through included routers, as (route with its full path, the route).

    FastAPI >= 0.16x keeps included routers as objects whose routes carry the full path in
    ``effective_route_contexts()``; older versions flattened them into ``app.routes``.
    """
    for item in app.routes:
        contexts = getattr(item, "effective_route_contexts", None)
        for route in contexts() if contexts else [item]:
            original = getattr(route, "original_route", route)
            if isinstance(original, APIRoute):
                yield route, original


def _api_routes(app):
    """(method, full path, dependant) of every route."""
    for route, _ in _route_contexts(app):
        for method in route.methods:
            yield method, route.path, route.dependant


def _routes(app) -> set[tuple[str, str]]:
    return {(method, path) for method, path, _ in _api_routes(app)}


def _calls(dependant) -> set:
    found = {dependant.call}
    for sub in dependant.dependencies:
        found |= _calls(sub)
    return found


def test_every_route_is_authenticated_or_explicitly_public(settings):
    routes = list(_api_routes(build_app(settings)))
    assert len(routes) >= len(MATRIX)
    for method, path, dependant in routes:
        calls = _calls(dependant)
        if (method, path) in PUBLIC:
            continue
        if path == "/metrics":  # public only when the operator says so
            assert metrics.metrics_access in calls
            continue
        assert governance.current_key in calls or governance.inference_key in calls, (
            f"{method} {path} is neither authenticated nor on the public list"
        )


def test_every_json_body_is_parsed_strictly(settings):
    """Half of a surrogate pair in a JSON body is a 400 before any route sees it."""
    for route, original in _route_contexts(build_app(settings)):
        if original.body_field is not None:
            assert isinstance(original, StrictJSONRoute), f"{route.path} reads json.loads"


def test_the_matrix_covers_every_route(settings):
    assert _routes(build_app(settings)) == set(MATRIX)


@pytest.fixture
def settings(tmp_path, template_database):
    """The suite's settings with the LLM's engine on a thread of the server: the matrix
    asks who may call each route, and starting an engine process took 3 to 4 s of each of
    the six chat and completion cells that load acme-chat."""
    home = home_with_database(tmp_path, template_database)
    return suite_settings(home, llm_engine_process=False)


@pytest.fixture(scope="module")
def unchanging_world(tmp_path_factory, template_database, model_sources):
    """One world for the module's requests that change nothing: every GET, and every
    request without a valid key (refused before its route runs). Building a world takes
    0.3 s, and these are 300 of the matrix's 390 cells."""
    home = home_with_database(tmp_path_factory.mktemp("routes"), template_database)
    with TestClient(build_app(suite_settings(home))) as client:
        yield World(client, key_maker(client), tenant_maker(client), model_sources)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("route", sorted(MATRIX), ids=lambda r: f"{r[0]} {r[1]}")
def test_role_route_matrix(request, route, role):
    (method, path, body), expected = MATRIX[route]
    changes_nothing = method == "GET" or role in ("none", "bad")
    world = request.getfixturevalue("unchanging_world" if changes_nothing else "world")
    path = path.replace("{user_key_id}", world.key_ids["user"]).replace("{job_id}", world.job_id)
    path = path.replace("{file_id}", world.file_id)
    path = path.replace("{fine_tuning_job_id}", world.fine_tuning_job_id)
    fills = {"{gguf}": str(world.gguf), "{file_id}": world.file_id}
    kwargs = {}
    if body == "{upload}":
        kwargs["files"] = {"file": ("t.jsonl", world.chats)}
        kwargs["data"] = {"purpose": "fine-tune"}
    elif body == "{csv}":
        kwargs["content"] = b"period,industry,adopters,source\n2024,retail,3,survey\n"
        kwargs["headers"] = {"content-type": "text/csv"}
    elif isinstance(body, dict):
        kwargs["json"] = {k: fills.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    elif body is not None:
        kwargs["content"] = world.gguf.read_bytes()
    headers = {**world.as_(role), **kwargs.pop("headers", {})}
    response = world.client.request(method, path, headers=headers, **kwargs)
    assert response.status_code == expected[role], response.text


def test_metrics_can_be_made_public(settings):
    from fastapi.testclient import TestClient

    with TestClient(build_app(settings.model_copy(update={"metrics_public": True}))) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/v1/models").status_code == 401
