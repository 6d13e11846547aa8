"""Click options derived from a config dataclass, so that each option is written once: the field.

    @dataclass
    class TrainConfig:
        lr: float = 1e-3
        '''Adam learning rate.'''                      (the option's help)
        activation: str = choice("topk", ACTIVATIONS)
        '''Sparsifier.'''

    @click.command()
    @options(TrainConfig)
    def main(**settings):
        run(TrainConfig(**settings))

Each field becomes `--<name>` with the field's type, default and docstring (the help text); a field
without a default is required. `bool` fields are flags (`--x`, or `--x/--no_x` when the default is
True), sequences are comma-separated (`--hooks a,b`), `choice(...)` fields a click.Choice. A nested
config dataclass (TrainConfig.policy) contributes its own fields when named in `flatten`. Fields with
metadata `cli=False` (library-only settings) have no option. The dataclass stays the one source: the
Python API and the command line build the same thing from the same defaults.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Callable, Sequence

import click


def choice(default: str | None, choices: Sequence[str], **metadata) -> dataclasses.Field:
    """A str field that takes one of `choices` (its option is a click.Choice)."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices), **metadata})


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (and of its dataclass bases), by name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source (a frozen install): options without help, not an error
            continue
        body = ast.parse(textwrap.dedent(source)).body[0].body
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _unwrap(annotation) -> tuple[type, type | None]:
    """(base type, element type of a sequence or None) of a field's annotation, `| None` set aside."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return origin, typing.get_args(annotation)[0]
    return annotation, None


def _split(element: type, container: type) -> Callable:
    def convert(ctx, param, value):
        if value is None or isinstance(value, container):
            return value
        try:
            return container(element(v.strip()) for v in value.split(",") if v.strip())
        except ValueError as err:
            raise click.BadParameter(f"expected comma-separated {element.__name__} values, got {value!r}") from err

    return convert


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def field_option(f: dataclasses.Field, annotation, help_text: str, **overrides) -> Callable:
    """The click option of one dataclass field (keyword `overrides` go to click.option)."""
    base, element = _unwrap(annotation)
    default = _default(f)
    kwargs: dict = {"help": help_text, "show_default": default not in (None, dataclasses.MISSING, (), [])}
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    decls = [f"--{f.name}"]
    if base is bool:
        kwargs["is_flag"] = True
        if default is True:
            decls = [f"--{f.name}/--no_{f.name}"]
    elif element is not None:
        kwargs.update(type=str, callback=_split(element, base), help=f"{help_text.rstrip('.')} (comma-separated).")
        if default not in (None, dataclasses.MISSING):
            kwargs["default"] = ",".join(str(v) for v in default)  # "" for an empty sequence
            kwargs["show_default"] = bool(default)
    elif "choices" in f.metadata:
        kwargs["type"] = click.Choice(f.metadata["choices"])
    else:
        kwargs["type"] = base
    if "envvar" in f.metadata:
        kwargs.update(envvar=f.metadata["envvar"], show_envvar=True)
    if "flag" in overrides:  # another option name than --<field>, e.g. --from for `source`
        overrides = dict(overrides)
        decls = [overrides.pop("flag"), f.name]
    kwargs.update(overrides)
    return click.option(*decls, **kwargs)


def options(cls: type, exclude: Sequence[str] = (), flatten: Sequence[str] = (), **overrides: dict) -> Callable:
    """A decorator adding one click option per field of the dataclass `cls`: the fields without a default
    (what is required) first, then the others in field order.

    `exclude`: fields without an option (the command sets them itself); `flatten`: fields holding a nested
    config dataclass whose fields become options instead; `overrides`: {field: click.option keywords}, where
    `flag` renames the option (source={"flag": "--from"}).
    """
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    decorators = []
    ordered = sorted(dataclasses.fields(cls), key=lambda f: _default(f) is not dataclasses.MISSING)
    for f in ordered:
        if f.name in exclude or not f.metadata.get("cli", True):
            continue
        if f.name in flatten:
            nested = hints[f.name]
            nested_hints, nested_docs = typing.get_type_hints(nested), field_docs(nested)
            decorators += [
                field_option(g, nested_hints[g.name], nested_docs.get(g.name, ""), **overrides.get(g.name, {}))
                for g in dataclasses.fields(nested)
                if g.name not in exclude
            ]
            continue
        decorators.append(field_option(f, hints[f.name], docs.get(f.name, ""), **overrides.get(f.name, {})))

    def decorate(fn: Callable) -> Callable:
        for decorator in reversed(decorators):  # as stacked decorators apply, last first: help lists field order
            fn = decorator(fn)
        return fn

    return decorate


def resume_option(target: str, budget: str) -> Callable:
    """A trainer's `--resume` flag: continue `target` with its saved settings; `budget` says how it trains longer."""
    text = (f"Continue {target} with its saved settings (options given explicitly override, e.g. --device; a "
            f"finished run continues only to a larger {budget}).")  # fmt: skip
    return click.option("--resume", is_flag=True, help=text)


def split_nested(cls: type, settings: dict, name: str) -> dict:
    """`settings` (flattened options) with the fields of the nested config `name` gathered into that config."""
    nested = typing.get_type_hints(cls)[name]
    own = {f.name for f in dataclasses.fields(nested)}
    return {**{k: v for k, v in settings.items() if k not in own},
            name: nested(**{k: v for k, v in settings.items() if k in own})}  # fmt: skip


def fields_of(config, cls: type) -> dict:
    """The values of `config` for the fields of the dataclass `cls` (a base class of its own, or a part of it)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}
