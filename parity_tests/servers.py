"""An in-process HTTP server on 127.0.0.1 that stands in for the Hugging Face Hub and OpenAI's bucket in tests.

It binds an ephemeral port, serves from dictionaries of bytes, answers at most ``max_requests`` requests (then
503), gives every connection a socket timeout, and is stopped by the test (``stop()``, also on exit of the
``with`` block). Nothing here ever contacts another address.

* Hub: ``HEAD|GET /{owner}/{name}/resolve/{revision}/{file}`` with the headers ``huggingface_hub`` reads
  (``X-Repo-Commit``, ``ETag``, ``Content-Length``) and its error codes (``X-Error-Code: RepoNotFound``,
  ``RevisionNotFound``, ``EntryNotFound``).
* Bucket: ``GET /{path}`` of ``files`` (keyed by the path, leading slash included) with HTTP ``Range`` (206 +
  ``Content-Range``), as Azure's blob store answers.
* Faults: ``cut_once`` paths (a Hub file's is ``/{repo}/{file}``) are sent half and the connection closed, once
  each; ``replace`` serves other bytes for a bucket path (a truncated or corrupted file on the server).
"""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field


@dataclass
class HubRepo:
    files: dict[str, bytes]
    revisions: dict[str, str] = field(default_factory=dict)  # tag or branch -> commit; "main" is always there

    def commit(self, revision: str) -> str | None:
        main = hashlib.sha1("\n".join(sorted(self.files)).encode()).hexdigest()
        known = {"main": main, **self.revisions}
        return known.get(revision) or (revision if revision in known.values() else None)


class FakeServer:
    """The server; ``log`` lists every request as (method, path, Range header or None)."""

    def __init__(self, files: dict[str, bytes] | None = None, repos: dict[str, HubRepo] | None = None,
                 max_requests: int = 200) -> None:
        self.files = dict(files or {})
        self.repos = dict(repos or {})
        self.cut_once: set[str] = set()
        self.replace: dict[str, bytes] = {}
        self.log: list[tuple[str, str, str | None]] = []
        self.max_requests = max_requests
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10  # seconds a connection may sit idle

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def do_HEAD(self) -> None:
                outer._answer(self, head=True)

            def do_GET(self) -> None:
                outer._answer(self, head=False)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def requests(self, method: str | None = None) -> list[tuple[str, str, str | None]]:
        with self._lock:
            return [r for r in self.log if method is None or r[0] == method]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- answers -----

    def _answer(self, handler: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(handler.path).path)
        with self._lock:
            self.log.append((handler.command, path, handler.headers.get("Range")))
            over = len(self.log) > self.max_requests
        if over:
            return self._send(handler, 503, b"", {}, head)
        hub = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if hub:
            return self._hub(handler, hub[1], hub[2], hub[3], head)
        data = self.replace.get(path, self.files.get(path))
        if data is None:
            return self._send(handler, 404, b"not found", {}, head)
        self._send_file(handler, path, data, head, {})

    def _hub(self, handler, repo_id: str, revision: str, filename: str, head: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._send(handler, 404, b"", {"X-Error-Code": "RepoNotFound"}, head)
        commit = repo.commit(revision)
        if commit is None:
            return self._send(handler, 404, b"", {"X-Error-Code": "RevisionNotFound"}, head)
        headers = {"X-Repo-Commit": commit}
        if filename not in repo.files:
            return self._send(handler, 404, b"", {**headers, "X-Error-Code": "EntryNotFound"}, head)
        data = repo.files[filename]
        headers["ETag"] = f'"{hashlib.sha256(data).hexdigest()}"'
        self._send_file(handler, f"/{repo_id}/{filename}", data, head, headers)

    def _send_file(self, handler, key: str, data: bytes, head: bool, headers: dict[str, str]) -> None:
        start, status = 0, 200
        asked = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range") or "")
        if asked and not head:
            start = int(asked[1])
            if start >= len(data):
                return self._send(handler, 416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        body = data[start:]
        with self._lock:
            cut = not head and key in self.cut_once
            if cut:
                self.cut_once.discard(key)
        if cut:  # announce everything, send half, hang up
            handler.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(body[: len(body) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(handler, status, body, {**headers, "Accept-Ranges": "bytes"}, head)

    @staticmethod
    def _send(handler, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        handler.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            handler.send_header(name, value)
        handler.end_headers()
        if not head:
            handler.wfile.write(body)


def closed_port_url() -> str:
    """A 127.0.0.1 URL on a port nothing listens on (bound, then released), for an unreachable server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
