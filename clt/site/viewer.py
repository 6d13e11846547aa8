"""Serve the docs site on localhost: `python -m clt.site.viewer [--port 8000]`, then open the printed address."""

from __future__ import annotations

import click

from clt.site.server import DOCS_DIR, make_server
from policy.cli import command


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
