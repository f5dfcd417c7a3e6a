"""What an uploaded file must be, by purpose, checked before it is kept; every problem is
reported with its line number (or its archive entry), a few at a time.

- ``fine-tune``: JSON Lines of chats, as OpenAI's fine-tuning takes them: each line an object
  with ``messages``, each message a ``role`` (system, developer, user, assistant, tool) and
  text ``content``, at least one assistant turn, at most ``max_chat_chars`` characters.
- ``batch``: JSON Lines of requests (``custom_id``, ``method``, ``url``, ``body``), as
  OpenAI's batch API takes them.
- ``dataset``: data for training a classic model: CSV with a header row (text or tabular
  columns and a label column, chosen when training), JSON Lines of objects, or an archive
  (.zip, .tar, .tar.gz, .tgz) of image folders, one folder per class.
"""

from __future__ import annotations

import csv
import json
import tempfile
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

from maas.artifacts.archive import (
    ARCHIVE_SUFFIXES,
    ArchiveLimits,
    extract_archive,
    is_archive,
)
from maas.errors import InvalidRequest, UnsafeArchive
from maas.registry.policy import check_path_text

PURPOSES = ("fine-tune", "batch", "dataset")
ROLES = ("system", "developer", "user", "assistant", "tool")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_PROBLEMS = 10
"""Problems listed in one answer (with how many there were in all)."""
MAX_LINE_BYTES = 16 * 1024 * 1024
"""Longest line of a JSON Lines file (a fine-tuning file's lines are bounded by the chat
size limit instead)."""
CHUNK = 1024 * 1024


class Problems:
    def __init__(self, what: str) -> None:
        self.what = what
        self.found: list[str] = []
        self.count = 0

    def add(self, where: str, text: str) -> None:
        self.count += 1
        if len(self.found) < MAX_PROBLEMS:
            self.found.append(f"{where}: {text}")

    def raise_any(self) -> None:
        if self.count:
            more = (
                f" (and {self.count - len(self.found)} more)"
                if self.count > len(self.found)
                else ""
            )
            raise InvalidRequest(
                f"{self.what} has {self.count} problem{'s' * (self.count > 1)}: "
                + "; ".join(self.found)
                + more,
                param="file",
            )


def check_upload_name(filename: str | None) -> str:
    """A plain file name: no folders, no '..', nothing the file system would choke on."""
    if not filename:
        raise InvalidRequest("the upload has no file name", param="file")
    if "/" in filename or "\\" in filename or filename in (".", "..") or filename.startswith("."):
        raise InvalidRequest(
            f"file name {filename!r} must be a plain name, without folders", param="file"
        )
    check_path_text(filename, param="file")
    return filename


def validate(
    purpose: str, filename: str, path: Path, *, max_chat_chars: int, limits: ArchiveLimits
) -> dict[str, Any]:
    """What the file holds (for its record), or InvalidRequest listing its problems."""
    if purpose not in PURPOSES:
        raise InvalidRequest(
            f"purpose must be one of {', '.join(PURPOSES)}; got {purpose!r}", param="purpose"
        )
    name = filename.lower()
    if purpose == "fine-tune":
        _suffix(name, (".jsonl",), purpose)
        return _chats(path, max_chat_chars)
    if purpose == "batch":
        _suffix(name, (".jsonl",), purpose)
        return _requests(path)
    if name.endswith(".csv"):
        return _csv(path)
    if name.endswith(".jsonl"):
        problems = Problems("the JSON Lines file")
        rows = sum(1 for _ in _objects(path, problems))
        if not rows and not problems.count:
            problems.add("file", "no rows")
        problems.raise_any()
        return {"format": "jsonl", "rows": rows}
    if is_archive(Path(name)):
        return _image_folders(path, name, limits)
    raise InvalidRequest(
        "a dataset is a .csv, a .jsonl, or an archive (.zip, .tar, .tar.gz, .tgz) of image "
        f"folders; got {filename!r}",
        param="file",
    )


def _suffix(name: str, suffixes: tuple[str, ...], purpose: str) -> None:
    if not name.endswith(suffixes):
        raise InvalidRequest(
            f"a {purpose} file is JSON Lines ({', '.join(suffixes)})", param="file"
        )


def _lines(path: Path, problems: Problems, max_bytes: int = MAX_LINE_BYTES):
    """(line number, text) of every non-empty line, each read in bounded memory: a line
    over ``max_bytes`` is a problem of its own (and skipped), as is one that is not UTF-8."""
    with path.open("rb") as source:
        number = 0
        while raw := source.readline(max_bytes + 1):
            number += 1
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                problems.add(f"line {number}", f"longer than {max_bytes} bytes")
                while (rest := source.readline(CHUNK)) and not rest.endswith(b"\n"):
                    pass
                continue
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                problems.add(f"line {number}", "not UTF-8 text")
                continue
            if text:
                yield number, text


def _objects(path: Path, problems: Problems, max_bytes: int = MAX_LINE_BYTES):
    """(line number, object) of every line that is a JSON object; other lines are problems,
    raised by the caller with its own (so all are listed together)."""
    for number, text in _lines(path, problems, max_bytes):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            problems.add(f"line {number}", f"not JSON ({err.msg})")
            continue
        if not isinstance(value, dict):
            problems.add(f"line {number}", "not a JSON object")
            continue
        yield number, value


def _chats(path: Path, max_chars: int) -> dict[str, Any]:
    problems = Problems("the fine-tuning file")
    examples = 0
    characters = 0
    for number, example in _objects(path, problems, max_chars * 4 + 65_536):
        where = f"line {number}"
        messages = example.get("messages")
        if not isinstance(messages, list) or not messages:
            problems.add(where, "no 'messages' list")
            continue
        size, assistant, ok = 0, False, True
        for index, message in enumerate(messages, start=1):
            if not isinstance(message, dict):
                problems.add(where, f"message {index} is not an object")
                ok = False
                break
            role = message.get("role")
            if role not in ROLES:
                problems.add(
                    where,
                    f"message {index} has no valid role (got {role!r}; use {', '.join(ROLES)})",
                )
                ok = False
                break
            content = message.get("content")
            if not isinstance(content, str):
                problems.add(where, f"message {index} ({role}) has no text 'content'")
                ok = False
                break
            weight = message.get("weight", 1)
            if (
                weight not in (0, 1)
                or isinstance(weight, bool)
                or ("weight" in message and role != "assistant")
            ):
                problems.add(where, f"message {index}: 'weight' is 0 or 1, on assistant messages")
                ok = False
                break
            size += len(content)
            assistant = assistant or (role == "assistant" and weight == 1)
        if not ok:
            continue
        if not assistant:
            problems.add(where, "no assistant message to learn from")
        elif size > max_chars:
            problems.add(where, f"the chat has {size} characters; at most {max_chars}")
        else:
            examples += 1
            characters += size
    if not examples and not problems.count:
        problems.add("file", "no examples")
    problems.raise_any()
    return {"format": "chat-jsonl", "examples": examples, "characters": characters}


def _requests(path: Path) -> dict[str, Any]:
    problems = Problems("the batch file")
    seen: set[str] = set()
    for number, request in _objects(path, problems):
        where = f"line {number}"
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            problems.add(where, "no 'custom_id'")
        elif custom_id in seen:
            problems.add(where, f"custom_id {custom_id!r} is used twice")
        else:
            seen.add(custom_id)
        if request.get("method") != "POST":
            problems.add(where, "'method' must be POST")
        if request.get("url") not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            problems.add(
                where, "'url' must be /v1/chat/completions, /v1/completions or /v1/embeddings"
            )
        if not isinstance(request.get("body"), dict):
            problems.add(where, "no 'body' object")
    if not seen and not problems.count:
        problems.add("file", "no requests")
    problems.raise_any()
    return {"format": "batch-jsonl", "requests": len(seen)}


def _csv(path: Path) -> dict[str, Any]:
    """Read as a stream (fields up to csv's limit, 128 KiB), never whole."""
    problems = Problems("the CSV file")
    rows = 0
    with path.open(encoding="utf-8-sig", newline="") as source:
        reader = csv.reader(source)
        try:
            header = next(reader, None)
            if header is None:
                raise InvalidRequest("the CSV file is empty; it needs a header row", param="file")
            if len(set(header)) != len(header) or any(not name.strip() for name in header):
                raise InvalidRequest(
                    "the CSV header needs distinct, non-empty column names", param="file"
                )
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    problems.add(
                        f"line {reader.line_num}",
                        f"{len(row)} columns; the header has {len(header)}",
                    )
                    continue
                rows += 1
        except UnicodeDecodeError:
            raise InvalidRequest(
                f"the CSV file is not UTF-8 text (after line {reader.line_num})", param="file"
            ) from None
        except csv.Error as err:
            problems.add(f"line {reader.line_num}", str(err))
    if not rows and not problems.count:
        problems.add("file", "no rows under the header")
    problems.raise_any()
    return {"format": "csv", "columns": header, "rows": rows}


def _image_folders(path: Path, name: str, limits: ArchiveLimits) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="maas-dataset-") as scratch:
        target = Path(scratch) / "x"
        named = Path(scratch) / ("upload" + next(s for s in ARCHIVE_SUFFIXES if name.endswith(s)))
        named.symlink_to(path)  # the extractor tells zip from tar by the name
        try:
            extract_archive(named, target, limits)
        except UnsafeArchive as err:
            raise InvalidRequest(str(err), param="file") from None
        return describe_image_folders(target)


def describe_image_folders(root: Path) -> dict[str, Any]:
    """Classes and image counts of a folder of class folders (one level may wrap them)."""
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not _images(entries[0]):
        root = entries[0]  # an archive of one folder that holds the class folders
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    problems = Problems("the image archive")
    counts: Counter[str] = Counter()
    for name in classes:
        counts[name] = len(_images(root / name))
        if not counts[name]:
            problems.add(f"folder {name}/", f"no images ({', '.join(IMAGE_SUFFIXES)})")
    loose = [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        problems.add("top level", f"files outside class folders: {', '.join(sorted(loose)[:3])}")
    if len(classes) < 2:
        problems.add("top level", f"{len(classes)} class folder(s); a classifier needs at least 2")
    problems.raise_any()
    return {"format": "image-folders", "classes": classes, "images": dict(counts)}


def _images(folder: Path) -> list[PurePosixPath]:
    return [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
