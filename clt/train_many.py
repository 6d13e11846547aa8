"""Run queued `python -m clt.train_transcoder` command lines one after another in one process (train_clt.sh's jobs).

    python -m clt.train_many QUEUE

QUEUE is a folder of `<name>.args` files, each one run's arguments separated by NUL bytes (what
`printf '%s\\0' ARG ...` writes). Workers started on the same folder claim the files in name order, one at a
time (a file is claimed by renaming it, which only one worker can do), so N workers share the runs as N
one-run processes would, while each pays the start of a process once: importing torch, numba and W&B and
reading the compiled kernels, 6-7 s of the demo's 20-s runs on this 2-core machine (three of them one after
another: 66 s as three processes, 46 s in one, with the same weights). A run that fails is reported and the
worker goes on with the others; it exits 1 if any failed, 130 when interrupted (the run saves its state).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from clt import train_transcoder

log = logging.getLogger(__name__)


def claim(queue: Path) -> tuple[Path, list[str]] | None:
    """The next unclaimed run of `queue` (its claimed file and arguments), or None when none is left."""
    for path in sorted(queue.glob("*.args")):
        taken = path.with_name(f"{path.name}.{os.getpid()}")
        try:
            path.rename(taken)
        except FileNotFoundError:  # another worker claimed it first
            continue
        return taken, taken.read_bytes().decode().split("\0")[:-1]
    return None


def run(queue: Path) -> list[Path]:
    """Train every run left in `queue`; the claimed files of the runs that failed."""
    if not queue.is_dir():
        raise click.ClickException(f"{queue} is not a folder of queued runs")
    failed = []
    while (claimed := claim(queue)) is not None:
        path, args = claimed
        click.echo(f"== {path.name}: python -m clt.train_transcoder {' '.join(args)}", err=True)
        try:
            train_transcoder.main.main(args=args, prog_name="python -m clt.train_transcoder", standalone_mode=False)
        except click.ClickException as err:  # bad arguments or input: what the command would print, then go on
            err.show()
            failed.append(path)
        except Exception:  # a bug in one run is no reason to drop the others
            log.exception("%s failed", path.name)
            failed.append(path)
    return failed


@click.command()
@click.argument("queue", type=click.Path(path_type=Path))
def main(queue):
    """Train the runs queued in the QUEUE folder (`<name>.args` files of NUL-separated clt.train_transcoder
    arguments), claiming them one at a time alongside other workers on the same folder."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    failed = run(queue)
    if failed:
        click.echo(f"train_many: {len(failed)} run(s) failed: {', '.join(p.name for p in failed)}", err=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
