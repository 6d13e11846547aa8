"""Every command-line tool documents every option and starts as `python -m <module>`."""

import importlib
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

CLIS = [
    "policy.train",
    "policy.solve",
    "policy.eval",
    "policy.import_run",
    "sae.collect_activations",
    "sae.train_topk",
    "clt.collect_pairs",
    "clt.inspect_pairs",
    "clt.train_transcoder",
    "clt.run_queue",
    "clt.summarize",
    "clt.list_pairs",
    "clt.eval",
    "clt.label",
    "clt.census",
    "bench.labels",
    "bench.faithfulness",
    "clt.generalize",
    "clt.graph.edges",
    "clt.graph.attribute",
    "clt.graph.intervene",
    "clt.site.export",
    "clt.site.viewer",
    "clt.site.screenshots",
    "bench.train",
    "bench.train_scaling",
    "bench.collect",
    "bench.attribution",
]


@pytest.mark.parametrize("module", CLIS)
def test_every_option_has_help(module):
    command = importlib.import_module(module).main
    undocumented = [p.name for p in command.params if isinstance(p, click.Option) and not p.help]
    assert not undocumented
    assert command.help


@pytest.mark.parametrize("module", ["policy.eval", "clt.inspect_pairs", "clt.train_transcoder", "clt.graph.attribute"])
def test_runs_as_a_module(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"Usage: python -m {module}")


@pytest.mark.parametrize("module", ["bench.train", "bench.collect"])
def test_a_bench_device_this_machine_lacks_is_a_usage_error(module):
    result = CliRunner().invoke(importlib.import_module(module).main, ["--device", "cuda:99"])
    assert result.exit_code == 2 and "--device cuda:99" in result.output and "Traceback" not in result.output
