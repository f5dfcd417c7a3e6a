"""Models as a caller may see them: another tenant's private model is "not found"."""

from __future__ import annotations

from maas.auth import policy
from maas.auth.principal import Principal, Role
from maas.registry import ModelRecord, Reference, Registry, VersionRecord, parse_reference


def visible_model(registry: Registry, viewer: Principal, name: str) -> ModelRecord:
    """The model, if the caller may use it (404 if invisible, 403 if not allowed)."""
    model = registry.get_model(name)
    policy.check_use_model(viewer, model.name, model.tenant_id)
    return model


def managed_model(registry: Registry, viewer: Principal, name: str) -> ModelRecord:
    """The model, if the caller may change it."""
    model = registry.get_model(name)
    policy.check_manage_model(viewer, model.name, model.tenant_id)
    return model


def resolve_for(registry: Registry, viewer: Principal, reference: str | Reference) -> VersionRecord:
    ref = parse_reference(reference) if isinstance(reference, str) else reference
    visible_model(registry, viewer, ref.name)
    return registry.resolve(ref)


def resolve_managed(
    registry: Registry, viewer: Principal, reference: str | Reference
) -> VersionRecord:
    """The version, if the caller may manage its model (load, unload): its own tenant's
    maintainers or admins; shared models, which other tenants use, only admins."""
    ref = parse_reference(reference) if isinstance(reference, str) else reference
    managed_model(registry, viewer, ref.name)
    return registry.resolve(ref)


def check_force(viewer: Principal, force: bool) -> None:
    """``force`` (unload a pinned model) is an admin's decision."""
    if force:
        policy.require_role(viewer, Role.admin)


def usable_models(registry: Registry, viewer: Principal) -> list[ModelRecord]:
    return [
        model
        for model in registry.list_models()
        if policy.may_use_model(viewer, model.name, model.tenant_id)
    ]
