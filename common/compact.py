"""Compressed JSON for what a job keeps in Redis: its graphs and its record's long values.

zlib with a preset dictionary: a job's values are mostly text its dictionary already holds, so
they shrink to a fraction of what zlib alone makes of them. Two kinds of dictionary:
- a workflow's templates (`workflows/render.py` `payload_dictionary`): its jobs' graphs are
  those templates with values bound in, and their params repeat the templates' defaults (the
  negative prompt). The API stores each one once in Redis (`keys.payload_dictionary`, extended
  by every submit that uses it, so it outlives what was compressed against it);
- `VOCABULARY`, fixed here, for the values workers write (results, errors, webhook states).
A compressed value names its dictionary (zlib's DICTID, the dictionary's Adler-32), so a reader
needs nothing else: `Dictionaries` finds it here or in Redis, once per process (dictionaries
never change: another content is another id).
"""
from __future__ import annotations

import functools
import json
import threading
import zlib

import redis

from common import keys

# Never edit: values compressed against it would no longer read. Add another one instead, and
# keep this one in KNOWN.
VOCABULARY = (
    b'{"source":"comfyui","code":"execution_error","message":"","details":{"prompt_id":"","node_id":"",'
    b'"node_type":"","exception_type":"","exception_message":"","traceback":[]}}'
    b'{"state":"delivered","attempts":1,"last_status":200,"last_error":null,"delivered_at":"2026-01-01T00:00:00.000Z"}'
    b'{"url":"https://","events":["started","progress","output"]}'
    b'[{"code":"comfyui_unreachable","gpu":"gpu.","message":"","at":"2026-01-01T00:00:00.000Z","from":"gpu.","to":"gpu."}]'
    b'{"images":[{"key":"00000000-0000-0000-0000-000000000000/1_0.png","content_type":"image/png","size":,"node":"",'
    b'"filename":"cs_00000000-0000-0000-0000-000000000000_00001_.png","width":1024,"height":1024}],"files":[]}'
)
KNOWN = {zlib.adler32(VOCABULARY): VOCABULARY}
_FDICT = 0x20  # RFC 1950: the stream names a preset dictionary (DICTID follows the header)


def dictionary_id(dictionary: bytes) -> int:
    return zlib.adler32(dictionary)


def named_dictionary(raw: bytes) -> int | None:
    """The id (Adler-32) of the dictionary a compressed value needs, or None for none."""
    if len(raw) >= 6 and raw[0] == 0x78 and raw[1] & _FDICT:
        return int.from_bytes(raw[2:6], "big")
    return None


def pack(value, dictionary: bytes | None = VOCABULARY, level: int = 9) -> bytes:
    data = value if isinstance(value, bytes) else json.dumps(value, separators=(",", ":")).encode()
    packer = zlib.compressobj(level, zdict=dictionary) if dictionary else zlib.compressobj(level)
    return packer.compress(data) + packer.flush()


class Dictionaries:
    """The dictionaries met so far: the fixed ones, and the workflows' read from Redis."""

    _cache: dict[int, bytes] = dict(KNOWN)  # shared by the process: an id names one content
    _lock = threading.Lock()

    def __init__(self, client: redis.Redis | None):
        self.redis = client

    def get(self, dict_id: int) -> bytes:
        found = self._cache.get(dict_id)
        if found is None and self.redis is not None:
            found = self.redis.get(keys.payload_dictionary(dict_id))
            if found is None:  # evicted or deleted: this version's own workflows may still make it
                found = _local_workflow_dictionaries().get(dict_id)
            if found is None:
                raise LookupError(f"compression dictionary {dict_id:08x} is not in Redis")
            with self._lock:
                self._cache[dict_id] = found
        return found

    def unpack(self, raw: bytes | str | None):
        """A stored value: compressed JSON (against a dictionary or not), or plain JSON."""
        if not raw:
            return None
        if isinstance(raw, str):
            raw = raw.encode()
        if raw[:1] != b"x":  # JSON never starts with x; zlib's header (deflate, 32 KB window) does
            return json.loads(raw)
        dict_id = named_dictionary(raw)
        unpacker = zlib.decompressobj(zdict=self.get(dict_id)) if dict_id is not None else zlib.decompressobj()
        return json.loads(unpacker.decompress(raw) + unpacker.flush())


@functools.cache
def _local_workflow_dictionaries() -> dict[int, bytes]:
    """The payload dictionaries of the workflows this process has (workflows/), by id: a job
    submitted by the same version reads back even if its dictionary left Redis."""
    from workflows.catalog import load_catalog  # here: common/ needs workflows/ only on this path
    from workflows.render import payload_dictionary

    made = (payload_dictionary(workflow) for workflow in load_catalog().values())
    return {dictionary_id(d): d for d in made}
