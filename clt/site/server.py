"""The docs site over HTTP on localhost: static files only (clt.site.viewer serves it; the screenshots and
browser tests serve it in a thread with `serve`)."""

from __future__ import annotations

import functools
import http.server
import logging
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

DOCS_DIR = Path(__file__).resolve().parents[2] / "docs"
"""The repository's docs/: SITE_FILES, data/ (clt.site.export) and img/ (clt.site.screenshots)."""
SITE_FILES = ("index.html", "app.js", "decisions_tab.js", "style.css")
"""The site itself: everything but its data."""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static files only: no directory listings, a 400 for a path with a NUL byte (which would make the base
    class raise), and request lines go to the logger instead of stderr."""

    def send_head(self):
        if "\x00" in urllib.parse.unquote(self.path):
            self.send_error(400, "Bad request path")
            return None
        return super().send_head()

    def list_directory(self, path):
        self.send_error(404, "No directory listings")
        return None

    def log_message(self, format, *args):
        log.debug("%s - %s", self.address_string(), format % args)


def make_server(docs_dir: str | Path = DOCS_DIR, port: int = 8000, host: str = "127.0.0.1") -> http.server.HTTPServer:
    """A threading HTTP server for docs_dir (port 0: any free port; the bound one is server.server_address[1])."""
    docs_dir = Path(docs_dir)
    if not (docs_dir / "index.html").is_file():
        raise FileNotFoundError(f"{docs_dir} has no index.html: point --docs_dir at the repository's docs/ folder")
    if not (docs_dir / "data" / "site.js").is_file():
        log.warning("%s/data/site.js is missing: run python -m clt.site.export --run_dir <run> first", docs_dir)
    handler = functools.partial(QuietHandler, directory=str(docs_dir))
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
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
