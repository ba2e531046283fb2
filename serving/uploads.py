"""Uploaded files held in memory: an upload never touches the disk.

BentoML's own file type (`pathlib.Path`) writes every upload into a ``bentoml-request-*``
folder of the system temp directory, under the client's file name, and a killed worker leaves
it there (patient images, DICOM headers included). `Upload` is what the image endpoints take
instead: BentoML still sees a file field (a `PurePath` subclass makes it multipart), but the
bytes stay in memory, and its path is a fixed neutral name, never the client's.

Starlette spools multipart file parts over 1 MB to an (unlinked) temporary file;
`keep_uploads_in_memory` raises that threshold to the request size limit, so the bytes are
never written anywhere (the body is bounded by that limit and read into memory anyway).
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, core_schema


class Upload(PurePosixPath):
    """One uploaded file's bytes (`data`); the path itself is the neutral name ``upload``."""

    data: bytes

    @classmethod
    def of(cls, data: bytes) -> Upload:
        upload = cls("upload")
        upload.data = data
        return upload

    def read_bytes(self) -> bytes:
        return self.data

    @classmethod
    def _validate(cls, value: Any) -> Upload:
        from starlette.datastructures import UploadFile

        if isinstance(value, Upload):
            return value
        if isinstance(value, UploadFile):
            value.file.seek(0)
            return cls.of(value.file.read())
        if isinstance(value, bytes):
            return cls.of(value)
        raise PydanticCustomError("file_type", "expected an uploaded file")

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda u: u.data),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        return {"type": "string", "format": "binary"}


def keep_uploads_in_memory(limit_bytes: int) -> None:
    """Let Starlette hold multipart file parts of up to `limit_bytes` in memory."""
    from starlette.formparsers import MultiPartParser

    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, int(limit_bytes))


__all__ = ["Upload", "keep_uploads_in_memory"]
