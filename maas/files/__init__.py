"""Uploaded files (OpenAI's ``/v1/files``): training data and batch input, per tenant."""

from maas.files.store import FileNotFound, FileRecord, FileStore
from maas.files.validation import PURPOSES

__all__ = ["PURPOSES", "FileNotFound", "FileRecord", "FileStore"]
