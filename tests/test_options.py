"""Each option is written once, as a config field: the command line and the Python API build the same config,
and so the same model, from the same defaults."""

import dataclasses
import importlib
import typing

import click
import pytest
from click.testing import CliRunner

from clt.config import CodeOptions, TranscoderOptions
from clt.graph.decision import DecisionOptions
from clt.model import TranscoderConfig
from clt.multilayer import MultiLayerConfig
from clt.train_transcoder import FIRST_LAYER_K_FACTOR, MULTILAYER_EXPANSION, MULTILAYER_K, TranscoderTrainConfig
from policy.options import choice, field_docs, options
from sae.model import SAEConfig
from sae.train_topk import SAETrainConfig

REQUIRED = {"run_dir": "somewhere"}
COMMANDS = [  # module, config class, extra required settings
    ("policy.train", "TrainConfig", {}),
    ("policy.eval", "EvalConfig", REQUIRED),
    ("policy.solve", "SolveConfig", {**REQUIRED, "instances": "x.npy"}),
    ("policy.import_run", "ImportConfig", {"source": "there", "run_name": "mine"}),
    ("sae.collect_activations", "CollectConfig", REQUIRED),
    ("sae.train_topk", "SAETrainConfig", {**REQUIRED, "hook": "encoder_layer_0"}),
    ("clt.collect_pairs", "CollectPairsConfig", REQUIRED),
    ("clt.train_transcoder", "TranscoderTrainConfig", {**REQUIRED, "pair": "clt_L0_to_L1"}),
    ("clt.eval", "EvalConfig", {"clt_dir": "a_transcoder"}),
    ("clt.generalize", "GeneralizeConfig", {**REQUIRED, "pair": "clt_L0_to_L1", "conditions": ("a", "b")}),
    ("clt.graph.edges", "EdgesConfig", {"clt_dir": "a_transcoder"}),
    ("clt.label", "LabelConfig", {**REQUIRED, "dictionary": ("a_folder", "another")}),
    ("clt.census", "CensusConfig", {"run_dirs": ("a", "b")}),
    ("clt.site.export", "ExportConfig", REQUIRED),
    ("clt.graph.attribute", "AttributeConfig", {**REQUIRED, "decision": DecisionOptions(step=3, seed=1)}),
    ("clt.graph.intervene", "InterveneConfig",
     {**REQUIRED, "changes": ["0:1:2=zero"], "decision": DecisionOptions(step=3, seed=1)}),
]  # fmt: skip


class Captured(Exception):
    """Raised by the stand-in for run(): carries the config the command built."""


def built_by_cli(module, args: dict, monkeypatch):
    def capture(cfg, *_, **__):
        raise Captured(cfg)

    monkeypatch.setattr(module, "run", capture)
    flat = {}
    for k, v in args.items():  # a nested config's options are its own fields (options(flatten=...))
        if dataclasses.is_dataclass(v):
            flat.update({f.name: getattr(v, f.name) for f in dataclasses.fields(v) if getattr(v, f.name) != f.default})
        else:
            flat[k] = v
    flags = [
        f"--{'from' if k == 'source' else k}={','.join(v) if isinstance(v, tuple | list) else v}"
        for k, v in flat.items()
    ]
    result = CliRunner().invoke(module.main, flags)
    assert isinstance(result.exception, Captured), result.output
    return result.exception.args[0]


@pytest.mark.parametrize(("name", "config", "required"), COMMANDS)
def test_the_command_line_builds_the_config_the_python_api_builds(name, config, required, monkeypatch):
    module = importlib.import_module(name)
    from_cli = built_by_cli(module, required, monkeypatch)
    assert from_cli == getattr(module, config)(**required)


@pytest.mark.parametrize(("name", "config", "required"), COMMANDS)
def test_every_option_has_the_fields_docstring_as_its_help(name, config, required):
    module = importlib.import_module(name)
    cls, docs = getattr(module, config), field_docs(getattr(module, config))
    params = {p.name: p for p in module.main.params}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):  # flattened: its fields are the options
            nested = field_docs(hints[f.name])
            for g in dataclasses.fields(hints[f.name]):
                assert nested.get(g.name) and nested[g.name].rstrip(".") in params[g.name].help, g.name
        elif f.metadata.get("cli", True):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            assert docs[f.name].rstrip(".") in params[f.name].help, f.name


def test_trainers_and_model_configs_share_their_defaults():
    assert TranscoderTrainConfig("r", "p").model_config(16, 12) == TranscoderConfig(16, 12)
    assert SAETrainConfig("r", "h").sae_config(16) == SAEConfig(d_in=16)
    multi = TranscoderTrainConfig("r", "clt_multilayer").multilayer_config(3, 16)
    k = MULTILAYER_K
    assert multi == MultiLayerConfig(n_layers=3, d=16, k=k, expansion_factor=MULTILAYER_EXPANSION,
                                     layer_k=[FIRST_LAYER_K_FACTOR * k, k, k])  # fmt: skip
    assert {f.name for f in dataclasses.fields(CodeOptions)} <= {f.name for f in dataclasses.fields(MultiLayerConfig)}
    assert TranscoderConfig(8, 8, activation="jumprelu").l0_coef == 1e-3  # the activation's default, in both
    assert (
        TranscoderTrainConfig("r", "p", activation="relu").l1_coef == TranscoderConfig(8, 8, activation="relu").l1_coef
    )


def test_options_map_types_choices_flags_and_sequences():
    @dataclasses.dataclass
    class Demo:
        name: str
        """Required."""
        mode: str = choice("a", ("a", "b"))
        """A or B."""
        weights: list[float] | None = None
        """Weights."""
        hooks: tuple[str, ...] = ()
        """Hooks."""
        fast: bool = False
        """Go fast."""
        keep: bool = True
        """Keep."""

    @click.command()
    @options(Demo)
    def main(**settings):
        click.echo(repr(Demo(**settings)))

    ok = CliRunner().invoke(main, ["--name", "x", "--mode", "b", "--weights", "1,2.5", "--hooks", "p, q", "--fast",
                                   "--no_keep"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip() == repr(Demo("x", "b", [1.0, 2.5], ("p", "q"), True, False))
    assert CliRunner().invoke(main, ["--name", "x"]).output.strip() == repr(Demo("x"))
    assert CliRunner().invoke(main, []).exit_code == 2  # --name is required
    assert "'c' is not one of" in CliRunner().invoke(main, ["--name", "x", "--mode", "c"]).output
    assert "comma-separated float" in CliRunner().invoke(main, ["--name", "x", "--weights", "1,a"]).output
    assert [p.name for p in main.params] == ["name", "mode", "weights", "hooks", "fast", "keep"]


def test_transcoder_options_are_not_written_twice():
    own = {f.name for f in dataclasses.fields(TranscoderTrainConfig)} - {
        f.name for f in dataclasses.fields(TranscoderOptions)
    }
    assert own.isdisjoint(f.name for f in dataclasses.fields(TranscoderConfig))


def test_configs_saved_before_the_options_were_written_once_still_load():
    import json
    from pathlib import Path

    old = json.loads((Path(__file__).parent / "fixtures" / "configs_0.1_b4b8ced" / "configs.json").read_text())
    for cls, saved in ((TranscoderConfig, old["transcoder"]), (MultiLayerConfig, old["multilayer"]),
                       (SAEConfig, old["sae"]), (TranscoderTrainConfig, old["transcoder_train"]),
                       (SAETrainConfig, old["sae_train"])):  # fmt: skip
        loaded = dataclasses.asdict(cls(**saved))
        assert {k: loaded[k] for k in saved} == saved, cls.__name__
