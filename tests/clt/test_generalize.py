"""clt.generalize: transcoders trained on several conditions, each evaluated on every condition."""

import json
import shutil

import pytest
from click.testing import CliRunner

from clt import collect_pairs as collect_cli
from clt import generalize as generalize_cli
from clt import train_transcoder as train_cli
from clt.model import load_transcoder
from clt.transfer import Condition, evaluate_on
from policy.loading import load_policy

PAIR = "clt_L1.mlp_in_to_L1.mlp_out"
HOOKS = "encoder_layer_1.mlp_in:encoder_layer_1.mlp_out"


@pytest.fixture(scope="module")
def two_conditions(tiny_source, tmp_path_factory):
    """A copy of the tiny run with the pair collected and a transcoder trained on uniform and on clustered."""
    run = tmp_path_factory.mktemp("generalize") / "tiny"
    shutil.copytree(tiny_source, run, ignore=shutil.ignore_patterns("sae", "clt"))
    for extra, condition in (([], []), (["--distribution", "clustered"], ["--condition", "clustered_n10_e1_seed0"])):
        args = ["--run_dir", str(run), "--layer_pairs", HOOKS, "--num_instances_per_pair", "40", *extra]
        assert CliRunner().invoke(collect_cli.main, args).exit_code == 0
        args = ["--run_dir", str(run), "--pair", PAIR, "--expansion_factor", "2", "--k", "3", "--batch_size", "64",
                "--num_epochs", "1", "--wandb_mode", "disabled", *condition]  # fmt: skip
        result = CliRunner().invoke(train_cli.main, args)
        assert result.exit_code == 0, result.output
    return run


def test_the_matrix_rows_are_trained_on_and_columns_evaluated_on(two_conditions, caplog):
    run = two_conditions
    args = ["--run_dir", str(run), "--pair", PAIR, "--conditions", f"{run},{run}:clustered,:uniform:12",
            "--num_instances", "12", "--batch_size", "6"]  # fmt: skip
    with caplog.at_level("WARNING"):
        result = CliRunner().invoke(generalize_cli.main, args)
    assert result.exit_code == 0, result.output
    out = run / "clt" / "generalize" / PAIR
    matrix = json.loads((out / "matrix.json").read_text())
    assert matrix["schema"] == "tsp-interp.generalize/1"
    assert matrix["evaluated_on"] == ["tiny@1 uniform n10", "tiny@1 clustered n10", "tiny@1 uniform n12"]
    assert [r["condition"] for r in matrix["trained_on"]] == matrix["evaluated_on"][:2]
    assert matrix["missing"] == ["tiny@1 uniform n12"]
    assert "--num_loc 12" in caplog.text and "clt.train_transcoder" in caplog.text  # how to make the missing row
    assert len(matrix["cells"]) == 2 and all(len(row) == 3 for row in matrix["cells"])
    clustered = load_transcoder(matrix["trained_on"][1]["transcoder"])
    direct = evaluate_on(clustered, "encoder_layer_1.mlp_in", "encoder_layer_1.mlp_out",
                         Condition(load_policy(run), "uniform", 12), 12, 2024, 6)  # fmt: skip
    assert matrix["cells"][1][2]["fvu"] == pytest.approx(direct["reconstruction"]["fvu"], rel=1e-6)
    assert matrix["cells"][1][2]["ridge_fvu"] == pytest.approx(direct["ridge_val_fvu"], rel=1e-6)
    assert (out / "matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "trained on \\ evaluated on" in (out / "matrix.md").read_text() and "splice gap" in result.output
    sizes = CliRunner().invoke(generalize_cli.main, [*args[:4], "--conditions", f"{run},:uniform:12", "--name", "sizes",
                                                      "--num_instances", "4"])  # fmt: skip
    assert sizes.exit_code == 0, sizes.output
    assert {p.name for p in out.iterdir()} == {f"{n}.{e}" for n in ("matrix", "sizes") for e in ("json", "md", "png")}


@pytest.mark.parametrize(("spec", "message"), [(":square", "distribution must be one of"),
                                               ("@x", "must be an epoch number"),
                                               (":uniform:2", "at least 3"), ("a:b:c:d", "expected RUN")])  # fmt: skip
def test_bad_conditions_are_one_line_errors(two_conditions, spec, message):
    args = ["--run_dir", str(two_conditions), "--pair", PAIR, "--conditions", spec]
    result = CliRunner().invoke(generalize_cli.main, args)
    assert result.exit_code == 1 and message in result.output, result.output
