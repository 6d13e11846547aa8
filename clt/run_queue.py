"""Run queued `python -m <command>` command lines one after another in one process (train_clt.sh's jobs).

    python -m clt.run_queue QUEUE

QUEUE is a folder of `<name>.args` files, each one command line: the module of one of the project's commands
(`clt.train_transcoder`, ...) and its arguments, separated by NUL bytes (what `printf '%s\\0' MODULE ARG ...`
writes). Workers started on the same folder claim the files in name order, one at a time (a file is claimed
by renaming it, which only one worker can do), so N workers share the lines as N processes of one line each
would, while each pays the start of a process once: importing torch, numba and W&B and reading the compiled
kernels, 6-7 s of the demo's 20-s trainings on this 2-core machine (three of them one after another: 66 s as
three processes, 46 s in one, with the same weights). A line that fails is reported and the worker goes on
with the others; it exits 1 if any failed, 130 when interrupted (a training saves its state first).
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import click

log = logging.getLogger(__name__)

PACKAGES = ("policy.", "sae.", "clt.")
"""Whose command modules a queued line may name."""


def claim(queue: Path) -> tuple[Path, list[str]] | None:
    """The next unclaimed line of `queue` (its claimed file and its words), or None when none is left."""
    for path in sorted(queue.glob("*.args")):
        taken = path.with_name(f"{path.name}.{os.getpid()}")
        try:
            path.rename(taken)
        except FileNotFoundError:  # another worker claimed it first
            continue
        return taken, taken.read_bytes().decode().split("\0")[:-1]
    return None


def command_of(module: str) -> click.Command:
    """The click command `python -m module` runs."""
    if not module.startswith(PACKAGES):
        raise click.ClickException(f"{module!r} is not a command of this project ({', '.join(PACKAGES)}...)")
    command = getattr(importlib.import_module(module), "main", None)
    if not isinstance(command, click.Command):
        raise click.ClickException(f"{module} has no command-line entry point")
    return command


def run(queue: Path) -> list[Path]:
    """Run every line left in `queue`; the claimed files of the lines that failed."""
    if not queue.is_dir():
        raise click.ClickException(f"{queue} is not a folder of queued command lines")
    failed = []
    while (claimed := claim(queue)) is not None:
        path, (module, *args) = claimed
        click.echo(f"== {path.name}: python -m {module} {' '.join(args)}", err=True)
        try:
            command_of(module).main(args=args, prog_name=f"python -m {module}", standalone_mode=False)
        except click.ClickException as err:  # bad arguments or input: what the command would print, then go on
            err.show()
            failed.append(path)
        except Exception:  # a bug in one line is no reason to drop the others
            log.exception("%s failed", path.name)
            failed.append(path)
    return failed


@click.command()
@click.argument("queue", type=click.Path(path_type=Path))
def main(queue):
    """Run the command lines queued in the QUEUE folder (`<name>.args` files: a command's module and its
    arguments, NUL-separated), claiming them one at a time alongside other workers on the same folder."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    failed = run(queue)
    if failed:
        click.echo(f"run_queue: {len(failed)} line(s) failed: {', '.join(p.name for p in failed)}", err=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
