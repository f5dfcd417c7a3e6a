"""``/v1/files`` in OpenAI's shape: upload (multipart), list, retrieve, content, delete.

Files are per tenant and for ``admin`` and ``maintainer`` keys (they feed jobs); a ``user``
key gets 403, another tenant's file is 404 (admins see all). An upload is streamed to disk
by the multipart parser, capped at ``MAAS_MAX_FILE_BYTES`` (413), checked for its purpose
(400 listing each problem with its line) and only then kept.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from maas.api import governance
from maas.api.deps import MaintainerKey
from maas.api.errors import KEYED_STATUSES, error_responses
from maas.api.hardening import StrictJSONRoute
from maas.auth.principal import Principal
from maas.files import FileRecord, FileStore

FILES_PATH = r"/v1/files"
router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    dependencies=[Depends(governance.maintainer_key)],
    responses=error_responses("/v1", *KEYED_STATUSES, 400, 403, 404, 413),
    route_class=StrictJSONRoute,  # uploads are multipart; the same request class for all
)


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    details: dict | None = None
    """What the upload's check found (maas's field): examples, columns, classes..."""

    @classmethod
    def of(cls, record: FileRecord) -> FileObject:
        return cls(
            id=record.id,
            bytes=record.bytes,
            created_at=int(record.created_at.timestamp()),
            filename=record.filename,
            purpose=record.purpose,
            details=record.details,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


def get_files(request: Request) -> FileStore:
    return request.app.state.files


FilesDep = Annotated[FileStore, Depends(get_files)]


def _scope(key: Principal) -> int | None:
    return None if key.is_admin else key.tenant_id


@router.post("/files")
async def upload_file(
    key: MaintainerKey,
    files: FilesDep,
    file: Annotated[UploadFile, File(description="The file: .jsonl, .csv or an archive")],
    purpose: Annotated[str, Form(max_length=32)],
) -> FileObject:
    kept = await run_in_threadpool(_spool, file)
    record = await run_in_threadpool(
        files.create, key.tenant_id, purpose, file.filename, kept, created_by=key.key_id
    )
    return FileObject.of(record)


def _spool(upload: UploadFile) -> Path:
    """The multipart parser's temporary file, copied to one of our own (removed by create)."""
    handle, name = tempfile.mkstemp(prefix="maas-upload-")
    try:
        with os.fdopen(handle, "wb") as out:
            upload.file.seek(0)
            shutil.copyfileobj(upload.file, out, 1024 * 1024)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


@router.get("/files")
async def list_files(
    key: MaintainerKey,
    files: FilesDep,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: Annotated[str | None, Query(max_length=40)] = None,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    found = await run_in_threadpool(
        files.list,
        _scope(key),
        purpose=purpose,
        limit=limit + 1,
        after=after,
        newest_first=order == "desc",
    )
    data = [FileObject.of(record) for record in found[:limit]]
    return FileList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=len(found) > limit,
    )


@router.get("/files/{file_id}")
async def retrieve_file(file_id: str, key: MaintainerKey, files: FilesDep) -> FileObject:
    return FileObject.of(await run_in_threadpool(files.get, file_id, _scope(key)))


@router.get(
    "/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def file_content(file_id: str, key: MaintainerKey, files: FilesDep) -> StreamingResponse:
    record = await run_in_threadpool(files.get, file_id, _scope(key))
    chunks = files.content(file_id, _scope(key))
    first = await run_in_threadpool(next, chunks, b"")  # a missing key fails here, as JSON

    def rest():
        yield first
        yield from chunks

    return StreamingResponse(
        rest(),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{record.filename}"'},
    )


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, key: MaintainerKey, files: FilesDep) -> FileDeleted:
    await run_in_threadpool(files.delete, file_id, _scope(key))
    return FileDeleted(id=file_id)
