"""The checks every request passes before it reaches an endpoint, as trusted local servers make them.

- **Host** (DNS rebinding): on a loopback bind, only whole loopback names — ``localhost``, an IPv4
  address in 127.0.0.0/8, ``::1`` — or a name given with ``--allowed-host``, case-insensitively. A
  name that merely starts with ``127.`` (``127.0.0.1.attacker.example``) is another host.
- **Origin** (cross-site requests): a browser names the page that sends a request; only the server's
  own page and ``--cors-origin`` origins may drive it. Requests without an Origin (apps, curl) pass.
- **Content type**: a POST must be ``application/json``. A web page can send ``text/plain`` (or a form)
  to any address without a CORS preflight; it cannot send JSON that way.
- **API key** and the declared body size, as before."""

from __future__ import annotations

import hmac
import ipaddress

from starlette.responses import JSONResponse

LOOPBACK_NAMES = ("localhost", "::1")
OPEN_PATHS = ("/health", "/")  # answered without the API key: a liveness probe and the page (it asks for the key)


def host_name(host_header: str) -> str:
    """The name part of a Host header, lowercased, without port, brackets or a final dot."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name[:-1] if name.endswith(".") else name


def is_loopback(name: str) -> bool:
    """localhost, ::1, or an IPv4 address in 127.0.0.0/8 — whole names only."""
    name = host_name(name)
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def error_for(path: str, status: int, message: str, param=None, code=None) -> JSONResponse:
    """An error in the shape of the API the path belongs to."""
    if path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)  # Ollama's shape
    kind = "authentication_error" if status == 401 else ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class Guard:
    """ASGI middleware running the checks above; the first that fails answers, nothing else runs."""

    def __init__(self, app, settings):
        self.app, self.settings = app, settings
        self.allowed_hosts = {host_name(h) for h in settings.allowed_hosts}
        self.check_host = is_loopback(settings.host) or bool(self.allowed_hosts)
        self.origins = {o.rstrip("/").lower() for o in settings.cors_origins}

    def problem(self, scope) -> tuple[int, str, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path, method = scope.get("path", ""), scope.get("method", "")
        host = headers.get("host", "")
        name = host_name(host)
        if self.check_host and not (is_loopback(name) or name in self.allowed_hosts):
            return 403, (f"Host '{host[:100]}' is not a name this server answers to (localhost, 127.x.x.x, ::1 or "
                         "--allowed-host)"), "host_not_allowed"
        origin = headers.get("origin")
        if origin is not None:
            own = f"{scope.get('scheme', 'http')}://{host}".lower()
            if origin.rstrip("/").lower() not in self.origins | {own}:
                return 403, (f"requests from the web page at {origin[:100]!r} are not allowed (start the server "
                             "with --cors-origin to allow a page)"), "origin_not_allowed"
        if self.settings.api_key and path not in OPEN_PATHS and method != "OPTIONS":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.settings.api_key}".encode()):
                return 401, "missing or wrong API key (send Authorization: Bearer KEY)", "invalid_api_key"
        if method == "POST":
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return 415, f"Content-Type must be application/json (got {media[:60] or 'none'!r})", "unsupported_media_type"
        length = headers.get("content-length")
        if length and (not length.isdigit() or int(length) > self.settings.max_body_bytes):
            return 413, f"request body over the {self.settings.max_body_bytes} byte limit", "request_too_large"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self.problem(scope)
        if problem is not None:
            return await error_for(scope.get("path", ""), problem[0], problem[1], code=problem[2])(scope, receive, send)
        return await self.app(scope, receive, send)
