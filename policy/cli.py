"""What every command-line tool does around its `run(cfg)`: logging, and errors a user can read."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import click

from policy.signals import Interrupted


@contextmanager
def command() -> Iterator[None]:
    """Inside a click command: INFO logging; bad input becomes a one-line error (exit 1), Ctrl-C exit 130."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        yield
    except Interrupted:
        raise SystemExit(130) from None
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        raise click.ClickException(str(err)) from err
