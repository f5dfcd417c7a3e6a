"""Two tenants: every route with an id answers 404 for the other tenant's private objects."""

from __future__ import annotations

import pytest

from tests.integration.security.test_routes import MATRIX, PUBLIC

# Each {id} route, with acme's objects filled in; globex's maintainer must get 404. Routes
# that refuse every maintainer by role (admins only: prices, potentials) answer 403 before
# any object is looked up, which the role matrix checks; a public route's {page} names a
# console page, not an object.
ID_ROUTES = {
    route: request
    for route, (request, expected) in MATRIX.items()
    if "{" in route[1] and expected["maintainer"] != 403 and route not in PUBLIC
}


@pytest.mark.parametrize("route", sorted(ID_ROUTES), ids=lambda r: f"{r[0]} {r[1]}")
def test_other_tenants_objects_are_not_found(world, route):
    method, path, body = ID_ROUTES[route]
    path = path.replace("{user_key_id}", world.key_ids["user"])
    kwargs = {}
    if isinstance(body, dict):
        kwargs["json"] = body
    elif body is not None:
        kwargs["content"] = world.gguf.read_bytes()
    response = world.client.request(method, path, headers=world.as_("globex"), **kwargs)
    if route == ("POST", "/api/v1/models/{name}/versions/upload"):
        # Model names are global: creating one whose name is taken says only that it is
        # taken, never whose it is or what it holds.
        assert response.status_code == 409, response.text
        assert response.json()["error"]["message"] == "the model name 'acme-model' is not available"
    else:
        assert response.status_code == 404, response.text
    # and nothing changed for acme
    assert (
        world.client.get("/api/v1/models/acme-model", headers=world.as_("maintainer")).json()[
            "versions"
        ][-1]["version"]
        == 2
    )


def test_lists_show_only_what_the_key_may_see(world):
    def ids(role):
        return {
            m["id"] for m in world.client.get("/v1/models", headers=world.as_(role)).json()["data"]
        }

    assert "globex-model" not in ids("user") and "acme-model" in ids("user")
    assert "shared-model" in ids("user")
    assert "acme-model" not in ids("globex") and "globex-model" in ids("globex")
    assert {"acme-model", "globex-model", "shared-model"} <= ids("admin")

    names = {
        m["name"]
        for m in world.client.get("/api/v1/models", headers=world.as_("globex")).json()["data"]
    }
    assert names == {"globex-model", "shared-model"}
    keys = world.client.get("/api/v1/keys", headers=world.as_("globex")).json()["data"]
    assert {k["tenant"] for k in keys} == {"globex"}
    tenants = world.client.get("/api/v1/tenants", headers=world.as_("globex")).json()["data"]
    assert [t["name"] for t in tenants] == ["globex"]


def test_maintainers_cannot_change_shared_models(world):
    response = world.client.put(
        "/api/v1/models/shared-model/aliases/production",
        json={"version": 1},
        headers=world.as_("maintainer"),
    )
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"
    assert (
        world.client.delete("/api/v1/models/shared-model", headers=world.as_("admin")).status_code
        == 204
    )


def test_a_model_outside_a_keys_allowed_list_is_forbidden(world, make_key):
    key = make_key("user", tenant="acme", allowed_models=["shared-model"])
    headers = {"Authorization": f"Bearer {key}"}
    assert world.client.get("/v1/models/shared-model", headers=headers).status_code == 200
    response = world.client.get("/v1/models/acme-model", headers=headers)
    assert response.status_code == 403 and "may not use model 'acme-model'" in response.text
    assert world.client.get("/v1/models/globex-model", headers=headers).status_code == 404
    listed = {m["id"] for m in world.client.get("/v1/models", headers=headers).json()["data"]}
    assert listed == {"shared-model", "shared-model:1"}


def test_usage_is_scoped_to_the_viewer(world):
    world.client.get("/v1/models", headers=world.as_("user"))
    world.client.get("/v1/models", headers=world.as_("globex"))

    def tenants(role):
        body = world.client.get("/api/v1/usage?group_by=tenant", headers=world.as_(role)).json()
        return {row["group"]["tenant"] for row in body["data"]}

    assert tenants("admin") == {"acme", "globex"}
    assert tenants("globex") == {"globex"}
    assert tenants("maintainer") == {"acme"}
    user_keys = world.client.get("/api/v1/usage?group_by=key", headers=world.as_("user")).json()
    assert {row["group"]["key"] for row in user_keys["data"]} == {world.key_ids["user"]}
