"""Output storage: a local directory and S3 (a real S3 endpoint: moto in server mode)."""
from __future__ import annotations

import boto3
import pytest

from common.storage import LocalStorage, S3Storage, make_key

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="outputs")
    return S3Storage("outputs", prefix="cs/", endpoint_url=s3_endpoint)


@pytest.fixture
def local(tmp_path):
    return LocalStorage(tmp_path / "outputs")


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_put_get_delete_round_trip(backend, request):
    storage = request.getfixturevalue(backend)
    key = make_key("0b6f1c9e-8a5b-4e55-9d35-0d3c3f0b7a11", 0, "image/png")
    assert key == "0b6f1c9e-8a5b-4e55-9d35-0d3c3f0b7a11/1_0.png"
    assert storage.get(key) is None
    storage.put(key, PNG, "image/png")
    assert storage.get(key) == PNG
    storage.delete_prefix("0b6f1c9e-8a5b-4e55-9d35-0d3c3f0b7a11")
    assert storage.get(key) is None


def test_s3_objects_carry_their_content_type(s3, s3_endpoint):
    s3.put("abc/1_1.png", PNG, "image/png")
    head = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").head_object(
        Bucket="outputs", Key="cs/abc/1_1.png")
    assert head["ContentType"] == "image/png"


@pytest.mark.parametrize("task_id", ["../etc", "a/b", "", "x" * 65, "..", "a b"])
def test_keys_cannot_be_built_from_hostile_ids(task_id):
    with pytest.raises(ValueError):
        make_key(task_id, 0, "image/png")


@pytest.mark.parametrize("key", ["../x/1_0.png", "/etc/passwd", "a/../../1_0.png", "a/1_0.png/..", "a/0.png"])
def test_reads_refuse_keys_the_service_did_not_make(local, key):
    with pytest.raises(ValueError):
        local.get(key)
