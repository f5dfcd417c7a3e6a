"""Who may see and do what. Pure functions of the caller; ``None`` is the local CLI (root).

Another tenant's private objects answer "not found" (as if they did not exist); what the
caller can see but not do answers "permission denied".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from maas.auth.principal import Principal, Role
from maas.errors import ModelNotFound, PermissionDenied

if TYPE_CHECKING:
    from maas.auth.store import KeySpec


def require_role(viewer: Principal | None, role: Role) -> None:
    if viewer is not None and not viewer.has_role(role):
        raise PermissionDenied(f"this needs a {role.value} key; this key is a {viewer.role.value}")


def can_see_tenant(viewer: Principal | None, tenant_id: int) -> bool:
    return viewer is None or viewer.is_admin or viewer.tenant_id == tenant_id


def can_see_model(viewer: Principal | None, model_tenant_id: int | None) -> bool:
    """Shared models (no tenant) are visible to all; private ones to their tenant and admins."""
    return model_tenant_id is None or can_see_tenant(viewer, model_tenant_id)


def may_use_model(viewer: Principal | None, name: str, model_tenant_id: int | None) -> bool:
    if not can_see_model(viewer, model_tenant_id):
        return False
    return viewer is None or viewer.allowed_models is None or name in viewer.allowed_models


def check_use_model(viewer: Principal | None, name: str, model_tenant_id: int | None) -> None:
    if not can_see_model(viewer, model_tenant_id):
        raise ModelNotFound(f"model {name!r} not found", param="model")
    if not may_use_model(viewer, name, model_tenant_id):
        raise PermissionDenied(f"this key may not use model {name!r}", param="model")


def check_manage_model(viewer: Principal | None, name: str, model_tenant_id: int | None) -> None:
    """Change a model: maintainers of its tenant, or admins (shared models: admins only)."""
    check_use_model(viewer, name, model_tenant_id)
    require_role(viewer, Role.maintainer)
    if viewer is not None and not viewer.is_admin and model_tenant_id != viewer.tenant_id:
        raise PermissionDenied(f"model {name!r} is shared; only admins change shared models")


def check_manage_key(viewer: Principal | None, role: Role) -> None:
    require_role(viewer, Role.maintainer)
    if viewer is not None and role.rank > viewer.role.rank:
        raise PermissionDenied(f"a {viewer.role.value} key cannot manage {role.value} keys")


def check_grant(creator: Principal | None, spec: KeySpec, tenant_id: int) -> None:
    """A key can never create a key with more rights than itself."""
    if creator is None:
        return
    check_manage_key(creator, spec.role)
    if not can_see_tenant(creator, tenant_id) or (
        not creator.is_admin and tenant_id != creator.tenant_id
    ):
        raise PermissionDenied("a key can only create keys in its own tenant")
    if creator.allowed_models is not None and (
        spec.allowed_models is None or not set(spec.allowed_models) <= creator.allowed_models
    ):
        raise PermissionDenied("the new key may only use models this key may use")
    if creator.expires_at is not None and (
        spec.expires_at is None or spec.expires_at > creator.expires_at
    ):
        raise PermissionDenied("the new key must expire no later than this key")
    for limit, ceiling in creator.limits.model_dump().items():
        wanted = getattr(spec.limits, limit)
        if ceiling is not None and (wanted is None or wanted > ceiling):
            raise PermissionDenied(f"the new key's {limit} must be set and at most {ceiling}")
