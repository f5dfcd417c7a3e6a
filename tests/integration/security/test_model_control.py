"""Loading and unloading are management actions: the role-by-route matrix for the two
unload routes and the two load routes, over models of each kind of ownership, pinned or not."""

from __future__ import annotations

import pytest

# acme's maintainer and user, globex's maintainer, the platform admin
ROLES = ("user", "maintainer", "globex", "admin")

ROUTES = {
    "v2": "/v2/repository/models/{model}/{action}",
    "manage": "/api/v1/models/{model}/versions/1/{action}",
}

# (model, action, force) -> {role: status}. acme-linear is acme's, shared-linear has no
# tenant (every tenant uses it), pinned-linear is acme's and pinned.
CELLS = {
    ("acme-linear", "load", False): {"user": 403, "maintainer": 200, "globex": 404, "admin": 200},
    ("acme-linear", "unload", False): {
        "user": 403,
        "maintainer": 200,
        "globex": 404,
        "admin": 200,
    },
    ("shared-linear", "load", False): {"user": 403, "maintainer": 403, "globex": 403, "admin": 200},
    ("shared-linear", "unload", False): {
        "user": 403,
        "maintainer": 403,
        "globex": 403,
        "admin": 200,
    },
    ("pinned-linear", "unload", False): {
        "user": 403,
        "maintainer": 409,
        "globex": 404,
        "admin": 409,
    },
    ("pinned-linear", "unload", True): {
        "user": 403,
        "maintainer": 403,
        "globex": 403,
        "admin": 200,
    },
}


@pytest.fixture
def controlled(world, model_sources):
    state = world.client.app.state
    acme = state.tenants.get_id("acme")
    state.registry.import_model(model_sources / "linear.onnx", "shared-linear")
    state.registry.import_model(model_sources / "linear.onnx", "pinned-linear", owner=acme)
    state.serving.pool.pinned = frozenset({("pinned-linear", 1)})
    return world


def _loaded(world) -> set[str]:
    deployments = world.client.get("/api/v1/deployments", headers=world.as_("admin")).json()
    return {d["model"] for d in deployments["data"]}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("cell", sorted(CELLS), ids=lambda c: f"{c[0]}-{c[1]}-force={c[2]}")
@pytest.mark.parametrize("role", ROLES)
def test_model_control_matrix(controlled, route, cell, role):
    world = controlled
    model, action, force = cell
    admin = world.as_("admin")
    for name in ("acme-linear", "shared-linear", "pinned-linear"):  # all loaded to start with
        world.client.post(f"/v2/repository/models/{name}/load", headers=admin)
    path = ROUTES[route].format(model=model, action=action)
    response = world.client.post(
        path, headers=world.as_(role), params={"force": "true"} if force else None
    )
    expected = CELLS[cell][role]
    assert response.status_code == expected, response.text
    still_loaded = model in _loaded(world)
    if action == "unload":
        assert still_loaded == (expected != 200), "a refused unload must leave the model loaded"
    if expected == 409:
        assert "pinned" in response.text and "force" in response.text
