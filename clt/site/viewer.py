"""Serve the docs site on localhost: `python -m clt.site.viewer [--port 8000]`, then open the printed address."""

from __future__ import annotations

import functools
import http.server
import logging
import urllib.parse
from pathlib import Path

import click

from policy.cli import command

log = logging.getLogger(__name__)

DOCS_DIR = Path(__file__).resolve().parents[2] / "docs"
"""The repository's docs/: SITE_FILES, data/ (clt.site.export) and img/ (clt.site.screenshots)."""
SITE_FILES = ("index.html", "app.js", "style.css")
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

    def log_message(self, format, *args):  # noqa: A002 (the base class names it so)
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


@click.command(context_settings={"show_default": True})
@click.option("--port", default=8000, help="Port on localhost (0: any free port).")
@click.option("--docs_dir", default=str(DOCS_DIR), help="The site folder (with index.html and data/site.js).")
@click.option("--host", default="127.0.0.1", help="Address to bind (0.0.0.0 exposes the site to your network).")
def main(port, docs_dir, host):
    """Serve the docs site (overview, SAE and CLT graphs, feature pages) until Ctrl-C."""
    with command():
        server = make_server(docs_dir, port, host)
    click.echo(f"serving {docs_dir} at http://{host}:{server.server_address[1]}/  (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
