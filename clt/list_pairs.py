"""Print what a pairs config lists: `python -m clt.list_pairs clt/configs/<run>.json` prints its pair names, one per
line; `--grid expansion_factors|k|k_ratio` prints that list of its `sparsity` block, space-separated; `--grids`
prints four lines: the pair names, then each of those lists, space-separated. `python -m clt.list_pairs --run_dir
R` (no config) prints the default pairs of run R (clt.pairs.default_layer_pairs), which clt.collect_pairs collects
for a run without a config; their sparsity lists are empty.

train_clt.sh reads its default grid (pairs, widths, k) from here, with one `--grids` call.
"""

from __future__ import annotations

import click

from clt.pairs import LayerPair, PairsConfig, default_layer_pairs, read_pairs_config, run_layer_count
from policy.cli import command
from policy.runs import resolve_run_dir

GRIDS = ("expansion_factors", "k", "k_ratio")


@click.command()
@click.argument("config", type=click.Path(dir_okay=False), required=False)
@click.option("--run_dir", default=None, help="Without CONFIG: print this run's default pairs.")
@click.option("--grid", type=click.Choice(GRIDS), default=None,
              help="Print this list of the config's sparsity block, space-separated, not the pair names.")  # fmt: skip
@click.option("--grids", is_flag=True,
              help="Print four lines: the pair names, expansion_factors, k and k_ratio, space-separated.")  # fmt: skip
def main(config, run_dir, grid, grids):
    """Print the pair names that the pairs CONFIG file lists (or, with --run_dir and no CONFIG, the run's default
    pairs), one per line, or one of its sparsity lists (used by train_clt.sh)."""
    with command():
        if (config is None) == (run_dir is None):
            raise ValueError("give one of a pairs CONFIG file and --run_dir (for the run's default pairs)")
        if config is not None:
            settings = read_pairs_config(config)
        else:
            pairs = default_layer_pairs(run_layer_count(resolve_run_dir(run_dir)))
            settings = PairsConfig(layer_pairs=pairs, expansion_factors=[])
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
