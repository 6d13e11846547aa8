"""A table of transcoder runs: validation FVU, L0 and dead features beside each pair's ridge baseline.

python -m clt.summarize runs/tsp20_demo/clt/clt_runs/*/2026*     # run folders
python -m clt.summarize --run_dir tsp20_demo                      # the newest finished run of every pair
python -m clt.summarize --run_dir tsp20_demo --sweep S [--list]   # the runs one sweep made (train_clt.sh)
"""

from __future__ import annotations

from pathlib import Path

import click

from policy.cli import command
from policy.io import read_json
from policy.runs import resolve_run_dir
from sae.runs import newest_runs, sweep_runs

COLUMNS = (
    "pair",
    "act",
    "features",
    "k",
    "lr",
    "val FVU",
    "ridge FVU",
    "ratio",
    "L0",
    "dead",
    "dense",
    "effective",
    "cosine",
    "splice",
    "recovered",
)


def read_summaries(folders: list[Path]) -> list[dict]:
    """summary.json (with the lr from train_cfg.json, and clt.eval's splice results when present) of each folder."""
    rows = []
    for folder in folders:
        if not (folder / "summary.json").is_file():
            raise FileNotFoundError(f"{folder} has no summary.json (an unfinished or interrupted run?)")
        row = {**read_json(folder / "summary.json"), "lr": read_json(folder / "train_cfg.json")["lr"]}
        if (folder / "eval" / "metrics.json").is_file():
            splice = read_json(folder / "eval" / "metrics.json").get("splice", {}).get("transcoder", {})
            row.update({"splice_gap": splice.get("gap"), "recovered": splice.get("recovered")})
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{COLUMNS[0]:<32}{COLUMNS[1]:>10}" + "".join(f"{c:>10}" for c in COLUMNS[2:])]
    for r in rows:
        ridge = r.get("ridge_val_fvu")
        k = "/".join(map(str, r["layer_k"])) if r.get("layer_k") else str(r["k"])  # a multi-layer CLT: 64/32/32
        ratio = r["val/fvu"] / ridge if ridge else float("nan")
        lines.append(
            f"{r['pair']:<32}{r['activation']:>10}{r['features']:>10}{k:>10}{r['lr']:>10.3g}{r['val/fvu']:>10.4f}"
            f"{ridge if ridge is not None else float('nan'):>10.4f}{ratio:>10.2f}{r['val/l0']:>10.1f}"
            f"{r['val/dead_fraction']:>10.1%}{_percent(r.get('val/dense_fraction'), 1):>10}"
            f"{_count(r.get('val/effective_features')):>10}{r['val/cosine']:>10.4f}"
            f"{_percent(r.get('splice_gap')):>10}{_percent(r.get('recovered')):>10}"
        )
    return "\n".join(lines)


def _percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}%}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def chosen_runs(folders: tuple[Path, ...], run_dir: str | None, sweep: str | None) -> list[Path]:
    """The given folders; with run_dir, also the sweep's runs, or without a sweep the newest of every pair."""
    if sweep and not run_dir:
        raise ValueError("--sweep needs --run_dir")
    chosen = list(folders)
    if run_dir:
        run = resolve_run_dir(run_dir)
        chosen += sweep_runs(run, sweep) if sweep else newest_runs(run, "clt")
    if not chosen:
        raise ValueError("give run folders, or --run_dir (with --sweep for one sweep's runs)")
    return chosen


@click.command()
@click.argument("folders", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--run_dir", default=None, help="Summarise the newest finished run of every pair of this run.")
@click.option("--sweep", default=None, help="With --run_dir: the runs this sweep made instead (train_clt.sh --sweep).")
@click.option("--list", "as_list", is_flag=True, help="Print the run folders, one per line, instead of the table.")
def main(folders, run_dir, sweep, as_list):
    """Print validation FVU, L0, dead features and the ridge baseline for transcoder run FOLDERS."""
    with command():
        chosen = chosen_runs(folders, run_dir, sweep)
        if as_list:
            click.echo("\n".join(str(f) for f in chosen))
            return
        rows = read_summaries(chosen)
        if run_dir:  # a sweep's runs finish in any order (train_clt.sh --jobs): the table goes by the grid
            rows.sort(key=lambda r: (r["pair"], r["activation"], r["features"], r["k"] or 0, r["lr"] or 0))
        click.echo(format_table(rows))


if __name__ == "__main__":
    main()
