"""The docs site over HTTP on localhost: static files only (clt.site.viewer serves it; the screenshots and
browser tests serve it in a thread with `serve`).

Only regular files whose resolved path stays inside the docs folder are served (a symlink planted in docs/
leads nowhere); connections are handled by a bounded pool of threads, and a connection idle for
`QuietHandler.timeout` seconds is closed; a client that goes away mid-response is not an error.
"""

from __future__ import annotations

import functools
import http.server
import logging
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

DOCS_DIR = Path(__file__).resolve().parents[2] / "docs"
"""The repository's docs/: SITE_FILES, data/ (clt.site.export) and img/ (clt.site.screenshots)."""
SITE_FILES = ("index.html", "app.js", "decisions_tab.js", "style.css")
"""The site itself: everything but its data."""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static files only: regular files inside the served folder (no directory listings, no way out through a
    symlink), a 400 for a path with a NUL byte (which would make the base class raise), and request lines go to
    the logger instead of stderr."""

    timeout = 10
    """Seconds a connection may stay idle before it is closed."""

    def send_head(self):
        if "\x00" in urllib.parse.unquote(self.path):
            self.send_error(400, "Bad request path")
            return None
        target = Path(self.translate_path(self.path))
        if target.is_dir() and self.path.split("?", 1)[0].endswith("/"):
            target = target / "index.html"
        root = Path(self.directory).resolve()
        resolved = target.resolve()
        if not (resolved.is_relative_to(root) and (resolved.is_file() or resolved.is_dir())):
            self.send_error(404, "File not found")
            return None
        return super().send_head()

    def list_directory(self, path):
        self.send_error(404, "No directory listings")
        return None

    def log_message(self, format, *args):
        log.debug("%s - %s", self.address_string(), format % args)


class PooledHTTPServer(http.server.HTTPServer):
    """An HTTP server whose connections are handled by a fixed pool of `workers` threads (one thread per
    connection would let idle clients pile up threads without bound)."""

    def __init__(self, address, handler, workers: int = 16):
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="docs-site")  # first: a failed bind closes it
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        self.pool.submit(self._handle, request, client_address)

    def _handle(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):  # the client went away or stayed silent
            log.debug("%s: %s", client_address, error)
            return
        log.warning("%s: %s: %s", client_address, type(error).__name__, error)

    def server_close(self):
        super().server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)


def make_server(docs_dir: str | Path = DOCS_DIR, port: int = 8000, host: str = "127.0.0.1") -> PooledHTTPServer:
    """A pooled HTTP server for docs_dir (port 0: any free port; the bound one is server.server_address[1])."""
    docs_dir = Path(docs_dir)
    if not (docs_dir / "index.html").is_file():
        raise FileNotFoundError(f"{docs_dir} has no index.html: point --docs_dir at the repository's docs/ folder")
    if not (docs_dir / "data" / "site.js").is_file():
        log.warning("%s/data/site.js is missing: run python -m clt.site.export --run_dir <run> first", docs_dir)
    handler = functools.partial(QuietHandler, directory=str(docs_dir))
    try:
        return PooledHTTPServer((host, port), handler)
    except OSError as err:
        raise ValueError(f"cannot serve on {host}:{port} ({err.strerror}); try another --port") from err


@contextmanager
def serve(docs_dir: str | Path = DOCS_DIR) -> Iterator[str]:
    """make_server's server for docs_dir on a free port, in a thread; yields its base URL."""
    server = make_server(docs_dir, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
