"""Shared by the clt tests: a copy of the tiny run with the layer-0 mlp pair collected; a Ctrl-C during training;
the docs site with the analysed tiny run exported."""

import os
import shutil
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

from clt import collect_pairs as collect_cli
from clt import label as label_cli
from clt.site import export as export_docs
from clt.site.server import DOCS_DIR, SITE_FILES
from clt.train_transcoder import TranscoderTrainer

PAIR = "clt_L0.mlp_in_to_L0.mlp_out"


@pytest.fixture(scope="module")
def pair_run(tiny_source, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clt_train") / "tiny"
    shutil.copytree(tiny_source, run_dir)
    args = ["--run_dir", str(run_dir), "--layer_pairs", "encoder_layer_0.mlp_in:encoder_layer_0.mlp_out",
            "--num_instances_per_pair", "60", "--batch_size", "32"]  # fmt: skip
    result = CliRunner().invoke(collect_cli.main, args)
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture
def ctrl_c_at_step(monkeypatch):
    """ctrl_c_at_step(n): SIGINT arrives during the n-th transcoder training step (the step finishes first)."""

    def arm(n: int) -> None:
        real, calls = TranscoderTrainer.train_step, {"n": 0}

        def interrupt(self, batch):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGINT)
            return real(self, batch)

        monkeypatch.setattr(TranscoderTrainer, "train_step", interrupt)

    return arm


@pytest.fixture(scope="session")
def site_dir(analysed_run, tmp_path_factory) -> Path:
    """The repository's site (index.html, app.js, style.css) with a labelled copy of the analysed tiny run exported
    into its data/: 5 features per dictionary, 3 maps per feature, at most 40 edges per graph."""
    docs = tmp_path_factory.mktemp("site") / "docs"
    docs.mkdir()
    for name in SITE_FILES:
        shutil.copy(DOCS_DIR / name, docs / name)
    run_dir = docs.parent / "tiny"  # a copy, labelled (clt.label) so that the pages show labels
    shutil.copytree(analysed_run, run_dir)
    labelled = CliRunner().invoke(label_cli.main, ["--run_dir", str(run_dir), "--all", "--num_instances", "40",
                                                   "--permutations", "10", "--min_auroc", "0.51"])  # fmt: skip
    assert labelled.exit_code == 0, labelled.output
    args = ["--run_dir", str(run_dir), "--out", str(docs / "data"), "--num_instances", "24", "--features", "5",
            "--top_instances", "3", "--edges", "40"]  # fmt: skip
    result = CliRunner().invoke(export_docs.main, args)
    assert result.exit_code == 0, result.output
    assert "site data written to" in result.output
    return docs
