"""A local web dashboard of a run: stdlib HTTP server in a thread, one page shipped in the
package (no CDN), and a JSON endpoint the page polls."""

from __future__ import annotations

import errno
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path

from fedforge.report.live import LiveState

log = logging.getLogger("fedforge")


def page() -> bytes:
    """The dashboard page (HTML with its script and styles inline)."""
    return files("fedforge.report").joinpath("assets/dashboard.html").read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", self.server.page)
        elif path == "/api/state":
            body = json.dumps(self.server.live.state(), allow_nan=False).encode()
            self._send(200, "application/json", body)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, code: int, kind: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: requests would scribble over the progress display."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], live: LiveState) -> None:
        super().__init__(address, _Handler)
        self.live = live
        self.page = page()


class Dashboard:
    """Serves ``run_dir``'s dashboard on ``host:port`` from a background thread until
    :meth:`close`. A taken port falls back to a free one (the URL says which)."""

    def __init__(self, run_dir: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        live = LiveState(run_dir)
        try:
            self._server = _Server((host, port), live)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or port == 0:
                raise
            log.info("port %d is taken; serving the dashboard on a free port", port)
            self._server = _Server((host, 0), live)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fedforge-dashboard", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> Dashboard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
