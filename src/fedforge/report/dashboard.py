"""A local web dashboard of a run: stdlib HTTP server in a thread, one page shipped in the
package (no CDN), and a JSON endpoint the page polls.

On loopback it serves anyone on this machine; beyond it, only requests carrying its token
(``?token=...`` once, then a cookie; or ``Authorization: Bearer ...``), and it refuses to
start without one. The token comes from the environment or a file, never the command line
(where every user of the machine can read it).
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import os
import threading
import urllib.parse
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path

from fedforge.core.errors import FedforgeError
from fedforge.report.live import LiveState

log = logging.getLogger("fedforge")
TOKEN_ENV = "FEDFORGE_DASHBOARD_TOKEN"
COOKIE = "fedforge_dashboard"
MIN_TOKEN_CHARS = 16


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback interface only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: Path | None) -> str | None:
    """The dashboard's token: the first line of ``token_file``, else the environment's
    :data:`TOKEN_ENV`, else None. A token shorter than :data:`MIN_TOKEN_CHARS` is refused."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise FedforgeError(f"cannot read the dashboard token file: {exc}") from None
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise FedforgeError(
            f"the dashboard token has {len(token)} characters, fewer than {MIN_TOKEN_CHARS}: "
            'make a longer one (python -c "import secrets; print(secrets.token_urlsafe())")'
        )
    return token


def page() -> bytes:
    """The dashboard page (HTML with its script and styles inline)."""
    return files("fedforge.report").joinpath("assets/dashboard.html").read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def _authorized(self, query: dict[str, list[str]]) -> tuple[bool, str | None]:
        """(whether the request may be answered, the token to set as a cookie)."""
        token = self.server.token
        if token is None:
            return True, None
        offered = [*query.get("token", [])]
        bearer = self.headers.get("Authorization", "")
        if bearer.startswith("Bearer "):
            offered.append(bearer[len("Bearer ") :])
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        if COOKIE in cookie:
            offered.append(cookie[COOKIE].value)
        good = any(hmac.compare_digest(o.encode(), token.encode()) for o in offered)
        return good, token if good and query.get("token") else None

    def do_GET(self) -> None:
        path, _, raw_query = self.path.partition("?")
        allowed, set_cookie = self._authorized(urllib.parse.parse_qs(raw_query))
        if not allowed:
            self._send(401, "text/plain; charset=utf-8", b"a token is required\n")
            return
        if path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", self.server.page, set_cookie)
        elif path == "/api/state":
            body = json.dumps(self.server.live.state(), allow_nan=False).encode()
            self._send(200, "application/json", body)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, code: int, kind: str, body: bytes, cookie: str | None = None) -> None:
        self.send_response(code)
        if cookie is not None:
            self.send_header("Set-Cookie", f"{COOKIE}={cookie}; HttpOnly; SameSite=Strict; Path=/")
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: requests would scribble over the progress display."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], live: LiveState, token: str | None) -> None:
        super().__init__(address, _Handler)
        self.live = live
        self.token = token
        self.page = page()


class Dashboard:
    """Serves ``run_dir``'s dashboard on ``host:port`` from a background thread until
    :meth:`close`. A taken port falls back to a free one (the URL says which). With a
    ``token``, only requests carrying it are answered; a host beyond loopback requires one."""

    def __init__(
        self, run_dir: Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None
    ) -> None:
        if token is None and not is_loopback_host(host):
            raise FedforgeError(
                f"refusing to serve the dashboard on {host} without a token: anyone who can "
                f"reach it could read the run; set {TOKEN_ENV} or pass --token-file FILE"
            )
        live = LiveState(run_dir)
        try:
            self._server = _Server((host, port), live, token)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or port == 0:
                raise
            log.info("port %d is taken; serving the dashboard on a free port", port)
            self._server = _Server((host, 0), live, token)
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
