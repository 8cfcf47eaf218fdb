"""Where output files live: a local directory (default) or S3-compatible object storage.

Keys are made by the service (`<task id>/<attempt>_<index>.<ext>`), never taken from a
caller or from ComfyUI's file names, so no path built from input can leave the store; the
attempt number keeps a second run of a job from overwriting the files of the first.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from common.settings import Settings

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif",
              "video/mp4": "mp4", "video/webm": "webm", "audio/flac": "flac", "audio/wav": "wav"}
_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}/([0-9]{1,3}_[0-9]{1,6}|log)\.[a-z0-9]{1,5}$")
LOG_CONTENT_TYPE = "application/x-ndjson"


def make_key(task_id: str, index: int, content_type: str, attempt: int = 1) -> str:
    key = f"{task_id}/{attempt}_{index}.{EXTENSIONS.get(content_type, 'bin')}"
    if not _KEY.match(key):
        raise ValueError(f"refusing to build a storage key from {task_id!r}")
    return key


def log_key(task_id: str) -> str:
    """Where a finished job's log lines go (JSON lines), out of Redis (workers/joblogs.py)."""
    key = f"{task_id}/log.jsonl"
    if not _KEY.match(key):
        raise ValueError(f"refusing to build a storage key from {task_id!r}")
    return key


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes | None: ...

    def delete_prefix(self, task_id: str) -> None: ...


@dataclass
class LocalStorage:
    root: Path

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError("invalid storage key")
        return self.root / key

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)  # readers never see half a file

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def delete_prefix(self, task_id: str) -> None:
        folder = self.root / task_id
        if _KEY.match(f"{task_id}/1_0.png") and folder.is_dir():
            for item in folder.iterdir():
                item.unlink()
            folder.rmdir()


class S3Storage:
    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str = "us-east-1"):
        import boto3  # only S3 deployments need it loaded

        self.bucket, self.prefix = bucket, prefix
        self.client = boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes | None:
        if not _KEY.match(key):
            raise ValueError("invalid storage key")
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def delete_prefix(self, task_id: str) -> None:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}{task_id}/")
        for item in listed.get("Contents", []):
            self.client.delete_object(Bucket=self.bucket, Key=item["Key"])


def make_storage(settings: Settings) -> Storage:
    if settings.storage_backend == "s3":
        if not settings.s3_bucket:
            raise ValueError("STORAGE_BACKEND=s3 needs S3_BUCKET")
        return S3Storage(settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url, settings.s3_region)
    return LocalStorage(Path(settings.storage_dir).resolve())
