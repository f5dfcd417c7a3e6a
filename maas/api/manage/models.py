"""Models, versions and aliases over HTTP: a few lines per route, the registry does the work."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import anyio
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from maas.api.deps import RegistryDep, SettingsDep
from maas.api.manage.schemas import (
    AliasUpdate,
    ModelImport,
    ModelPublic,
    ModelsPublic,
    VersionDetail,
    VersionPublic,
    VersionsPublic,
)
from maas.artifacts.archive import ARCHIVE_SUFFIXES
from maas.errors import InvalidRequest, PayloadTooLarge, UnsupportedFormat
from maas.registry import Reference
from maas.registry.manifest import Task
from maas.registry.names import validate_alias_name, validate_model_name
from maas.registry.policy import check_file_names

router = APIRouter(prefix="/api/v1", tags=["management"])

UPLOAD_SUFFIXES = (".gguf", ".onnx", *ARCHIVE_SUFFIXES)


@router.get("/models")
def list_models(registry: RegistryDep) -> ModelsPublic:
    models = [ModelPublic.of(m) for m in registry.list_models()]
    return ModelsPublic(data=models, count=len(models))


@router.post("/models", status_code=201)
def import_model(body: ModelImport, registry: RegistryDep) -> VersionPublic:
    """Import files already on the server's disk (what ``maas models import`` does)."""
    record = registry.import_model(
        Path(body.path), body.name, task=body.task, alias=body.alias, description=body.description
    )
    return VersionPublic.of(record)


@router.post("/models/{name}/versions/upload", status_code=201)
async def upload_version(
    name: str,
    filename: str,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    task: Task | None = None,
    alias: str | None = None,
    description: str | None = None,
) -> VersionPublic:
    """Import the request body (a .gguf, .onnx or archive file) as a new version."""
    validate_model_name(name)
    if alias is not None:
        validate_alias_name(alias)
    _check_upload_name(filename)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes:
        raise PayloadTooLarge(f"upload is over the {settings.max_upload_bytes}-byte limit")
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
        )
    return VersionPublic.of(record)


@router.get("/models/{name}")
def get_model(name: str, registry: RegistryDep) -> ModelPublic:
    return ModelPublic.of(registry.get_model(name))


@router.delete("/models/{name}", status_code=204)
def delete_model(name: str, registry: RegistryDep) -> Response:
    registry.delete_model(name)
    return Response(status_code=204)


@router.get("/models/{name}/versions")
def list_versions(name: str, registry: RegistryDep) -> VersionsPublic:
    versions = [VersionPublic.of(v) for v in registry.get_model(name).versions]
    return VersionsPublic(data=versions, count=len(versions))


@router.get("/models/{name}/versions/{version}")
def get_version(name: str, version: int, registry: RegistryDep) -> VersionDetail:
    record = registry.resolve(Reference(validate_model_name(name), version=version))
    return VersionDetail.of_manifest(record, registry.read_manifest(record))


@router.delete("/models/{name}/versions/{version}", status_code=204)
def delete_version(name: str, version: int, registry: RegistryDep, force: bool = False) -> Response:
    registry.delete_version(name, version, force=force)
    return Response(status_code=204)


@router.put("/models/{name}/aliases/{alias}")
def set_alias(name: str, alias: str, body: AliasUpdate, registry: RegistryDep) -> VersionPublic:
    return VersionPublic.of(registry.set_alias(name, alias, body.version))


@router.delete("/models/{name}/aliases/{alias}", status_code=204)
def delete_alias(name: str, alias: str, registry: RegistryDep) -> Response:
    registry.delete_alias(name, alias)
    return Response(status_code=204)


def _check_upload_name(filename: str) -> None:
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
