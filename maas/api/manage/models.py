"""Models, versions and aliases over HTTP: a few lines per route, the registry does the work.

Maintainers manage their tenant's models; admins manage all, shared ones included. Importing
from a path on the server's disk is for admins only.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import anyio
from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from maas.api import governance
from maas.api.access import (
    check_force,
    managed_model,
    resolve_for,
    resolve_managed,
    usable_models,
    visible_model,
)
from maas.api.deps import AdminKey, MaintainerKey, RegistryDep, SettingsDep, TenantsDep
from maas.api.errors import KEYED_STATUSES, error_responses
from maas.api.hardening import StrictJSONRoute
from maas.api.inference import ServingDep
from maas.api.manage.schemas import (
    AliasUpdate,
    DeploymentPublic,
    DeploymentsPublic,
    ModelImport,
    ModelPublic,
    ModelsPublic,
    ModelUpdate,
    VersionDetail,
    VersionPublic,
    VersionReport,
    VersionsPublic,
)
from maas.artifacts.archive import ARCHIVE_SUFFIXES
from maas.auth.principal import Principal
from maas.auth.store import TenantStore
from maas.errors import (
    InvalidRequest,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    UnsupportedFormat,
)
from maas.registry import Reference, Registry
from maas.registry.manifest import Task
from maas.registry.names import validate_alias_name, validate_model_name
from maas.registry.policy import check_file_names, check_path_text
from maas.registry.service import ANY_OWNER, Owner
from maas.routing.serving import Serving

router = APIRouter(
    prefix="/api/v1",
    tags=["management"],
    dependencies=[Depends(governance.maintainer_key)],
    responses=error_responses("/api/v1", *KEYED_STATUSES, 403),
    route_class=StrictJSONRoute,
)

UPLOAD_SUFFIXES = (".gguf", ".onnx", *ARCHIVE_SUFFIXES)
UPLOAD_PATH = r"/api/v1/models/[^/]+/versions/upload"
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "The model file itself: a .gguf, .onnx, or an archive of a folder",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.get("/models")
def list_models(key: MaintainerKey, registry: RegistryDep) -> ModelsPublic:
    models = [ModelPublic.of(m) for m in usable_models(registry, key)]
    return ModelsPublic(data=models, count=len(models))


@router.post(
    "/models", status_code=201, responses=error_responses(router.prefix, 400, 404, 409, 413)
)
def import_model(
    body: ModelImport, key: AdminKey, registry: RegistryDep, tenants: TenantsDep
) -> VersionPublic:
    """Import files already on the server's disk (what ``maas models import`` does)."""
    owner = tenants.get_id(body.tenant) if body.tenant is not None else ANY_OWNER
    record = registry.import_model(
        Path(body.path),
        body.name,
        task=body.task,
        alias=body.alias,
        description=body.description,
        owner=owner,
        sampling=body.sampling.set_fields() if body.sampling else None,
    )
    return VersionPublic.of(record)


@router.post(
    "/models/{name}/versions/upload",
    status_code=201,
    responses=error_responses(router.prefix, 400, 404, 409, 413),
    openapi_extra=UPLOAD_BODY,
)
async def upload_version(
    name: str,
    filename: str,
    request: Request,
    key: MaintainerKey,
    registry: RegistryDep,
    settings: SettingsDep,
    tenants: TenantsDep,
    task: Task | None = None,
    alias: str | None = None,
    description: str | None = None,
    tenant: str | None = None,
) -> VersionPublic:
    """Import the request body (a .gguf, .onnx or archive file) as a new version."""
    validate_model_name(name)
    if alias is not None:
        validate_alias_name(alias)
    _check_upload_name(filename)
    owner = await run_in_threadpool(_upload_owner, registry, key, name, tenant, tenants)
    with registry.store.stage() as upload:
        target = upload.path / filename
        await _receive(request, target, settings.max_upload_bytes)
        record = await run_in_threadpool(
            registry.import_model,
            target,
            name,
            task=task,
            alias=alias,
            description=description,
            consume=True,
            source_label=filename,
            owner=owner,
        )
    return VersionPublic.of(record)


@router.get("/models/{name}", responses=error_responses(router.prefix, 400, 404))
def get_model(name: str, key: MaintainerKey, registry: RegistryDep) -> ModelPublic:
    return ModelPublic.of(visible_model(registry, key, name))


@router.delete(
    "/models/{name}", status_code=204, responses=error_responses(router.prefix, 400, 404)
)
def delete_model(name: str, key: MaintainerKey, registry: RegistryDep) -> Response:
    owner = managed_model(registry, key, name).tenant_id
    registry.delete_model(name, owner=owner)
    return Response(status_code=204)


@router.get("/models/{name}/versions", responses=error_responses(router.prefix, 400, 404))
def list_versions(name: str, key: MaintainerKey, registry: RegistryDep) -> VersionsPublic:
    versions = [VersionPublic.of(v) for v in visible_model(registry, key, name).versions]
    return VersionsPublic(data=versions, count=len(versions))


@router.get("/models/{name}/versions/{version}", responses=error_responses(router.prefix, 400, 404))
def get_version(
    name: str, version: int, key: MaintainerKey, registry: RegistryDep
) -> VersionDetail:
    record = resolve_for(registry, key, Reference(validate_model_name(name), version=version))
    return VersionDetail.of_manifest(record, registry.read_manifest(record))


@router.get(
    "/models/{name}/versions/{version}/report",
    responses=error_responses(router.prefix, 400, 404),
)
def get_version_report(
    name: str, version: int, key: MaintainerKey, registry: RegistryDep
) -> VersionReport:
    """The report of a version an optimization made; 404 for any other version."""
    record = resolve_for(registry, key, Reference(validate_model_name(name), version=version))
    manifest = registry.read_manifest(record)
    if (manifest.recipe or {}).get("kind") != "optimize":
        raise NotFound(
            f"{record.reference} was not made by an optimization, so it has no report",
            param="version",
        )
    return VersionReport.of_manifest(manifest)


@router.delete(
    "/models/{name}/versions/{version}",
    status_code=204,
    responses=error_responses(router.prefix, 400, 404, 409),
)
def delete_version(
    name: str, version: int, key: MaintainerKey, registry: RegistryDep, force: bool = False
) -> Response:
    owner = managed_model(registry, key, name).tenant_id
    registry.delete_version(name, version, force=force, owner=owner)
    return Response(status_code=204)


@router.put(
    "/models/{name}/aliases/{alias}", responses=error_responses(router.prefix, 400, 404, 409, 413)
)
async def set_alias(
    name: str, alias: str, body: AliasUpdate, key: MaintainerKey, serving: ServingDep
) -> VersionPublic:
    """Move an alias; a served model loads the new version first (zero-downtime switch)."""
    owner = managed_model(serving.registry, key, name).tenant_id
    return VersionPublic.of(await serving.move_alias(name, alias, body.version, owner))


@router.patch("/models/{name}", responses=error_responses(router.prefix, 400, 404, 413))
async def update_model(
    name: str, body: ModelUpdate, key: MaintainerKey, serving: ServingDep
) -> ModelPublic:
    """Change a model's batching settings (loaded versions use them from the next batch) or
    its default sampling parameters (from the next request); each part left out stays."""
    record = managed_model(serving.registry, key, name)
    if body.serving is not None:
        if (body.serving.pipeline_stages or 1) > 1:
            await run_in_threadpool(serving.check_splittable, name)
        settings = body.serving.model_dump(exclude_none=True)
        record = await run_in_threadpool(
            serving.registry.set_serving, name, settings, owner=record.tenant_id
        )
        await run_in_threadpool(serving.pool.configure, name)
    if body.sampling is not None:
        record = await run_in_threadpool(
            serving.registry.set_sampling, name, body.sampling.set_fields(), owner=record.tenant_id
        )
    return ModelPublic.of(record)


@router.post(
    "/models/{name}/versions/{version}/load", responses=error_responses(router.prefix, 400, 404)
)
async def load_version(
    name: str, version: int, key: MaintainerKey, serving: ServingDep
) -> DeploymentPublic:
    """Load a version now (in the style of Triton's model-control API)."""
    record = resolve_managed(
        serving.registry, key, Reference(validate_model_name(name), version=version)
    )
    await serving.pool.get(record)
    return next(d for d in _deployments(serving, key) if d.model == name and d.version == version)


@router.post(
    "/models/{name}/versions/{version}/unload",
    responses=error_responses(router.prefix, 400, 404, 409),
)
async def unload_version(
    name: str, version: int, key: MaintainerKey, serving: ServingDep, force: bool = False
) -> dict[str, bool]:
    """Unload a version once its running requests finish; a pinned version needs an admin
    key and ``force=true``."""
    check_force(key, force)
    record = resolve_managed(
        serving.registry, key, Reference(validate_model_name(name), version=version)
    )
    return {"unloaded": await serving.pool.unload(record, force=force)}


@router.get("/deployments")
def list_deployments(key: MaintainerKey, serving: ServingDep) -> DeploymentsPublic:
    """The loaded model versions the key may see."""
    data = _deployments(serving, key)
    return DeploymentsPublic(data=data, count=len(data))


def _deployments(serving: Serving, key: Principal) -> list[DeploymentPublic]:
    visible = {m.name for m in usable_models(serving.registry, key)}
    return [DeploymentPublic(**d) for d in serving.loaded() if d["model"] in visible]


@router.delete(
    "/models/{name}/aliases/{alias}",
    status_code=204,
    responses=error_responses(router.prefix, 400, 404),
)
def delete_alias(name: str, alias: str, key: MaintainerKey, registry: RegistryDep) -> Response:
    owner = managed_model(registry, key, name).tenant_id
    registry.delete_alias(name, alias, owner=owner)
    return Response(status_code=204)


def _upload_owner(
    registry: Registry, key: Principal, name: str, tenant: str | None, tenants: TenantStore
) -> Owner:
    """Who owns the model an upload goes into: the existing owner if the caller may change
    it; for a new model, a maintainer's own tenant or an admin's choice (default: shared)."""
    try:
        return managed_model(registry, key, name).tenant_id
    except ModelNotFound:
        pass
    if not key.is_admin:
        if tenant is not None and tenant != key.tenant:
            raise PermissionDenied("a maintainer imports models into its own tenant only")
        return key.tenant_id
    return tenants.get_id(tenant) if tenant is not None else ANY_OWNER


def _check_upload_name(filename: str) -> None:
    check_path_text(filename, "filename", param="filename")
    if PurePosixPath(filename).name != filename or filename.startswith(".") or "\\" in filename:
        raise InvalidRequest("filename must be a plain file name", param="filename")
    check_file_names([filename])
    if not filename.lower().endswith(UPLOAD_SUFFIXES):
        raise UnsupportedFormat(
            f"upload a file ending in {', '.join(UPLOAD_SUFFIXES)}; "
            "a Hugging Face folder goes up as a .tar.gz or .zip",
            param="filename",
        )


async def _receive(request: Request, target: Path, limit: int) -> None:
    received = 0
    with open(target, "xb") as sink:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(f"upload is over the {limit}-byte limit")
            await anyio.to_thread.run_sync(sink.write, chunk)
    if received == 0:
        raise InvalidRequest("the request body is empty; send the model file as the body")
