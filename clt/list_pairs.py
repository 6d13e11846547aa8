"""Print what a pairs config lists: `python -m clt.list_pairs clt/configs/<run>.json` prints its pair names, one per
line; `--grid expansion_factors|k|k_ratio` prints that list of its `sparsity` block, space-separated; `--grids`
prints four lines: the pair names, then each of those lists, space-separated.

train_clt.sh reads its default grid (pairs, widths, k) from here, with one `--grids` call.
"""

from __future__ import annotations

import click

from clt.pairs import LayerPair, read_pairs_config
from policy.cli import command

GRIDS = ("expansion_factors", "k", "k_ratio")


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--grid", type=click.Choice(GRIDS), default=None,
              help="Print this list of the config's sparsity block, space-separated, not the pair names.")  # fmt: skip
@click.option("--grids", is_flag=True,
              help="Print four lines: the pair names, expansion_factors, k and k_ratio, space-separated.")  # fmt: skip
def main(config, grid, grids):
    """Print the pair names that the pairs CONFIG file lists, one per line, or one of its sparsity lists (used by
    train_clt.sh)."""
    with command():
        settings = read_pairs_config(config)
        names = [LayerPair.from_spec(item).name for item in settings.layer_pairs]
        if grids:
            for line in (names, *(getattr(settings, g) for g in GRIDS)):
                click.echo(" ".join(str(v) for v in line))
        elif grid is not None:
            click.echo(" ".join(str(v) for v in getattr(settings, grid)))
        else:
            click.echo("\n".join(names))


if __name__ == "__main__":
    main()
