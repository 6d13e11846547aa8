"""Print the pair names a pairs config lists, one per line: `python -m clt.list_pairs clt/configs/<run>.json`.

train_clt.sh reads its default grid of pairs from here.
"""

from __future__ import annotations

import click

from clt.pairs import LayerPair, read_pairs_config
from policy.cli import command


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
def main(config):
    """Print the pair names that the pairs CONFIG file lists, one per line (used by train_clt.sh)."""
    with command():
        for item in read_pairs_config(config).layer_pairs:
            if item.count(":") != 1:
                raise ValueError(f"a layer pair is 'source:target', got {item!r}")
            click.echo(LayerPair(*(part.strip() for part in item.split(":"))).name)


if __name__ == "__main__":
    main()
