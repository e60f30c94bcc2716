"""A real S3-protocol endpoint on loopback for the object-store tests: moto's server mode.

MosaicML Streaming's own tests do the same. The server runs in a thread of the test process on
127.0.0.1 (a free port); ``S3_ENDPOINT_URL`` points Composer's ``S3ObjectStore`` and Streaming's
S3 uploader and downloader at it, and dummy credentials keep boto3 from looking for real ones.
Subprocesses (``composer -n 2``) inherit the variables and reach the same server.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

BUCKET = "handover"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on a free loopback port with an empty ``handover`` bucket; yields the
    environment variables that point boto3 (and the processes given them) at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_SESSION_TOKEN": "testing",
    }
    try:
        client = boto3.client(
            "s3",
            endpoint_url=env["S3_ENDPOINT_URL"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=BUCKET)
        yield env
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_bucket() -> Iterator[str]:
    """``s3://handover``: an empty bucket on a moto server, with the environment pointing at it."""
    pytest.importorskip("moto", reason="moto[server] is in requirements-dev.txt (make install)")
    with moto_s3() as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield f"s3://{BUCKET}"
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def list_keys(prefix: str = "") -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))
