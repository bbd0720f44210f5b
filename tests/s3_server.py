"""An S3-compatible store on 127.0.0.1 for tests, and a proxy in front of it that breaks reads.

`moto_s3()`: moto's standalone server (what s3fs's own test suite runs against), in a thread of
this process, on an ephemeral loopback port. `FlakyProxy`: an HTTP proxy on 127.0.0.1 that
passes requests to it and, for the objects it is told to, answers a GET with the response
headers and the first `cut_after` bytes of the body and then resets the connection (a
connection reset mid-object), or stops sending (a stalled read), or answers 503 SlowDown,
either for the first `times` GETs of that object or for every one. It records each GET's object and Range header, so a test
can count the attempts and see where a retry resumed.
"""

from __future__ import annotations

import http.client
import logging
import socket
import struct
import threading
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

# Dummy credentials and region: moto accepts any, and nothing reaches a real AWS account.
TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1; yields its endpoint URL and stops it on exit."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@dataclass
class Fault:
    """Break GETs of one object: after `cut_after` body bytes, `mode` "reset" or "stall"
    (or "503": answer 503 SlowDown instead);
    the first `after_gets` GETs pass, then `times` of them break (None: all the rest).
    `at_byte`: only GETs whose range holds this byte (so that every reading of the object
    breaks at the same place, however often it is read)."""

    cut_after: int
    mode: str = "reset"
    times: int | None = None
    after_gets: int = 0
    at_byte: int | None = None

    def covers(self, byte_range: str | None) -> bool:
        if self.at_byte is None:
            return True
        if byte_range is None:
            return True  # the whole object
        start, _, end = byte_range.removeprefix("bytes=").partition("-")
        return int(start) <= self.at_byte and (not end or self.at_byte <= int(end))


class _Proxy(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hang up on broken responses, and tests shut down mid-request: expected


class FlakyProxy:
    """Forwards to `upstream` (an http://host:port endpoint); see the module doc."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").rstrip("/").split(":")
        self.upstream = (host, int(port))
        self.faults: dict[str, Fault] = {}  # object path ("/bucket/key") -> fault
        self.gets: list[tuple[str, str | None]] = []  # (object path, Range header) of each GET
        self.broken: dict[str, int] = defaultdict(int)  # object path -> GETs broken so far
        self.release = threading.Event()  # ends stalled responses (at shutdown)
        self._lock = threading.Lock()
        self._server = _Proxy(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, name="flaky-proxy",
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def gets_of(self, path: str) -> list[str | None]:
        """The Range headers of the GETs of one object, in order."""
        with self._lock:
            return [rng for p, rng in self.gets if p == path]

    def _fault_for(self, method: str, path: str, byte_range: str | None) -> Fault | None:
        with self._lock:
            if method == "GET":
                self.gets.append((path, byte_range))
            fault = self.faults.get(path) if method == "GET" else None
            if fault is None:
                return None
            seen = sum(1 for p, _ in self.gets if p == path)
            if (seen <= fault.after_gets or not fault.covers(byte_range)
                    or (fault.times is not None and self.broken[path] >= fault.times)):
                return None
            self.broken[path] += 1
            return fault

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body,
                                     headers={k: v for k, v in self.headers.items()})
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                path = self.path.split("?", 1)[0]
                fault = proxy._fault_for(self.command, path, self.headers.get("Range"))
                if fault is not None and fault.mode == "503":
                    # What S3 answers when it sheds load.
                    error = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                             b"<Message>Please reduce your request rate.</Message></Error>")
                    self.send_response_only(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                self.send_response_only(response.status, response.reason)
                # A HEAD's Content-Length is the object's size: passed on as it is.
                dropped = ("transfer-encoding", "connection") + (
                    () if self.command == "HEAD" else ("content-length",))
                for name, value in response.getheaders():
                    if name.lower() not in dropped:
                        self.send_header(name, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault is None:
                    self.wfile.write(data)
                    return
                self.wfile.write(data[:fault.cut_after])
                self.wfile.flush()
                if fault.mode == "stall":
                    proxy.release.wait()
                # SO_LINGER 0: close with a TCP reset, as a dropped connection looks to a client.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.close_connection = True

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        return Handler

    def start(self) -> FlakyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@contextmanager
def flaky_proxy(upstream: str) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(upstream).start()
    try:
        yield proxy
    finally:
        proxy.stop()
