"""Connection-level limits that uvicorn leaves open, and a log that a flood cannot fill.

uvicorn starts no timer on a new connection before its first response, and counts idle connections
against nothing: ~1000 idle sockets exhaust a common `ulimit -n 1024`, after which asyncio logs an
accept() error on every loop turn. Here: a cap on open connections (the next one gets a JSON 503 and
is closed at once), a deadline for a connection to deliver its request headers (slow-loris), the
open-file limit raised to its hard limit, and log lines of one kind rate-limited."""

from __future__ import annotations

import json
import logging
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_CONNECTIONS = 128
HEADER_TIMEOUT_S = 10.0  # from connecting (or the end of the previous response) to a complete request head
LOG_BURST, LOG_WINDOW_S = 5, 10.0  # per kind of message: this many lines per window, then a count


def _busy() -> bytes:
    body = json.dumps({"error": {"message": f"the server has {MAX_CONNECTIONS} connections open; try again",
                                 "type": "server_error", "param": None, "code": "too_many_connections"}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with the connection cap and the request-head deadline."""

    max_connections = MAX_CONNECTIONS
    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = None
        if len(self.connections) > self.max_connections:
            transport.write(_busy())
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        self._seen_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.cycle is self._seen_cycle and not self.transport.is_closing():  # still no new request
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self._head_timer is not None and self.cycle is not self._seen_cycle:  # a request head arrived
            self._head_timer.cancel()
            self._head_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._head_timer is None:
            self._arm()  # the next request on this keep-alive connection has the same deadline

    def connection_lost(self, exc) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


def raise_open_file_limit() -> int:
    """The soft open-file limit raised to the hard one (what the connection cap needs headroom from)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        return soft
    except (ImportError, ValueError, OSError):
        return -1


class RateLimit(logging.Filter):
    """At most LOG_BURST records of one kind (logger + message template) per LOG_WINDOW_S; the rest are
    counted and reported once the window has passed. Tracebacks are kept to their last line."""

    def __init__(self):
        super().__init__()
        self.windows: dict[tuple, list] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = (record.name, str(record.msg)[:80])
        window = self.windows.setdefault(key, [now, 0, 0])  # start, passed, suppressed
        if now - window[0] > LOG_WINDOW_S:
            if window[2]:
                record.msg = f"{record.msg} ({window[2]} more like this in the last {LOG_WINDOW_S:g} s)"
            window[:] = [now, 0, 0]
        if window[1] >= LOG_BURST:
            window[2] += 1
            return False
        window[1] += 1
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.msg}: {type(record.exc_info[1]).__name__}: {str(record.exc_info[1])[:200]}"
            record.exc_info, record.exc_text = None, None
        if len(self.windows) > 1024:
            self.windows.clear()
        return True


def quiet_logs() -> None:
    limit = RateLimit()
    for name in ("asyncio", "uvicorn", "uvicorn.error", "uvicorn.access", "acestep_gguf.server"):
        logging.getLogger(name).addFilter(limit)
