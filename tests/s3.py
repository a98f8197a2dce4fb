"""A real S3-compatible server for the tests: moto's, over HTTP on 127.0.0.1, counting the
requests it serves (fixture `s3_server` in tests/conftest.py)."""

from __future__ import annotations

import logging
from pathlib import Path

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}
class S3Server:
    """A real S3-compatible server (moto's, over HTTP on 127.0.0.1) that counts requests."""

    BUCKET = "crossdet-runs"

    def __init__(self):
        import threading

        import boto3
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
        app = DomainDispatcherApplication(create_backend_app)
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._lock = threading.Lock()

        def counting(environ, start_response):
            with self._lock:
                self.requests.append((environ["REQUEST_METHOD"], environ["PATH_INFO"],
                                      environ.get("HTTP_RANGE")))
            return app(environ, start_response)

        self._server = make_server("127.0.0.1", 0, counting, threaded=True)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.port}",
                                   region_name="us-east-1")
        self.client.create_bucket(Bucket=self.BUCKET)

    def uri(self, prefix: str) -> str:
        """The URI the command takes, with the options that reach this server."""
        return (f"s3://{self.BUCKET}/{prefix}?endpoint_override=127.0.0.1:{self.port}"
                "&scheme=http&region=us-east-1")

    def upload(self, folder: str | Path, prefix: str) -> list[str]:
        """Every file under `folder` to `prefix/`; the keys written."""
        keys = []
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(folder).as_posix()}"
                self.client.put_object(Bucket=self.BUCKET, Key=key, Body=path.read_bytes())
                keys.append(key)
        return keys

    def full_downloads(self, key: str) -> int:
        """GETs of the whole object `key` (header reads are ranged and smaller)."""
        size = self.client.head_object(Bucket=self.BUCKET, Key=key)["ContentLength"]
        whole = {None, f"bytes=0-{size - 1}"}
        with self._lock:
            return sum(1 for method, path, byte_range in self.requests
                       if method == "GET" and path == f"/{self.BUCKET}/{key}"
                       and byte_range in whole)

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.BUCKET,
                                                                      Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def text(self, key: str) -> str:
        return self.client.get_object(Bucket=self.BUCKET, Key=key)["Body"].read().decode()

    def stop(self) -> None:
        self._server.shutdown()


