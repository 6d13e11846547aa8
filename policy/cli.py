"""What every command-line tool does around its `run(cfg)`: logging, and errors a user can read."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import click
from click.core import ParameterSource

from policy.signals import Interrupted


@contextmanager
def command() -> Iterator[None]:
    """Inside a click command: INFO logging; bad input and OS errors (missing, read-only, full) become a one-line
    error (exit 1), Ctrl-C exit 130."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        yield
    except Interrupted:
        raise SystemExit(130) from None
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    except OSError as err:  # missing, read-only or full: say which file and why, in one line
        where = f": {err.filename}" if err.filename and str(err.filename) not in str(err.strerror) else ""
        raise click.ClickException(f"{err.strerror or err}{where}") from err


def explicit_options() -> set[str]:
    """The options of the running click command that the user gave (command line or environment)."""
    ctx = click.get_current_context()
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {name for name in ctx.params if ctx.get_parameter_source(name) in given}
