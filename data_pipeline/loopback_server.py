"""A throwaway HTTP server on 127.0.0.1 that serves one folder, so img2dataset downloads for real.

Bound to the loopback interface only and to an ephemeral port (0: the kernel picks a free one),
so parallel test runs never collide and nothing is exposed to the network. Used as a context
manager: the server is shut down and its socket closed on every exit path, errors and Ctrl-C
included.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator


class _QuietHandler(SimpleHTTPRequestHandler):
    """Serves files without printing a line per request (img2dataset makes thousands)."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


class _Server(ThreadingHTTPServer):
    # Without this, request threads would keep the interpreter alive after an interrupted run.
    daemon_threads = True
    # img2dataset opens hundreds of connections at once; the default backlog of 5 turns a burst
    # into "connection refused" failures that have nothing to do with the corpus.
    request_queue_size = 1024


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve `folder` over HTTP on 127.0.0.1; yields the base URL, e.g. 'http://127.0.0.1:41234'."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="loopback-http", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
