"""The policy CLIs end to end on a tiny run: train -> solve -> eval, and their errors."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from policy import eval as eval_cli
from policy import solve as solve_cli
from policy.env import generate

TSPLIB = """NAME : square5
TYPE : TSP
DIMENSION : 5
EDGE_WEIGHT_TYPE : EUC_2D
NODE_COORD_SECTION
1 0 0
2 100 0
3 100 100
4 0 100
5 50 -10
EOF
"""


def _solve(*args):
    return CliRunner().invoke(solve_cli.main, [str(a) for a in args])


def test_solve_npy_batch_and_single(tiny_run, tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, generate(5, 12, seed=0).numpy())
    out = tmp_path / "tours.npy"
    for decode in ("greedy", "sample", "multistart"):
        result = _solve("--run_dir", tiny_run, "--instances", x, "--out", out, "--decode", decode, "--augment", "8")
        assert result.exit_code == 0, result.output
        tours = np.load(out)
        assert tours.dtype == np.int64 and tours.shape == (5, 12)
        assert (np.sort(tours, axis=1) == np.arange(12)).all()
    np.save(x, generate(1, 7, seed=1).numpy()[0])  # one instance [n, 2]
    result = _solve("--run_dir", tiny_run, "--instances", x, "--out", out)
    assert result.exit_code == 0, result.output
    assert np.load(out).shape == (1, 7)


def test_solve_tsplib_reports_length_in_file_units(tiny_run, tmp_path):
    path = tmp_path / "square5.tsp"
    path.write_text(TSPLIB)
    out = tmp_path / "tours.npy"
    result = _solve("--run_dir", tiny_run, "--instances", path, "--out", out, "--decode", "multistart")
    assert result.exit_code == 0, result.output
    tour = np.load(out)[0].tolist()
    assert sorted(tour) == [0, 1, 2, 3, 4]
    coords = np.array([[0, 0], [100, 0], [100, 100], [0, 100], [50, -10]], dtype=float)
    expected = sum(np.linalg.norm(coords[a] - coords[b]) for a, b in zip(tour, tour[1:] + tour[:1], strict=True))
    assert f"tour length: {expected:.2f}" in result.output
    assert "TSPLIB EUC_2D length" in result.output


@pytest.mark.parametrize(
    "content, message",
    [
        (np.array([[[0.0, np.nan], [1, 1], [0, 1]]]), "finite"),
        (np.zeros((2, 5, 3)), "shape"),
        (np.zeros((2, 2, 2)), "at least 3"),
        (np.array(["a", "b"]), "float"),
    ],
)
def test_solve_bad_instances_are_clear_errors(tiny_run, tmp_path, content, message):
    x = tmp_path / "bad.npy"
    np.save(x, content)
    result = _solve("--run_dir", tiny_run, "--instances", x, "--out", tmp_path / "t.npy")
    assert result.exit_code == 1 and message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "t.npy").exists()


def test_solve_rejects_pickled_npy(tiny_run, tmp_path):
    x = tmp_path / "obj.npy"
    np.save(x, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    result = _solve("--run_dir", tiny_run, "--instances", x)
    assert result.exit_code == 1 and "not a plain numeric" in result.output


def test_solve_unsupported_tsplib(tiny_run, tmp_path):
    path = tmp_path / "geo.tsp"
    path.write_text(TSPLIB.replace("EUC_2D", "GEO"))
    result = _solve("--run_dir", tiny_run, "--instances", path)
    assert result.exit_code == 1 and "EUC_2D" in result.output


def test_missing_run_and_checkpoint_are_clear_errors(tiny_run, tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, generate(1, 5, seed=0).numpy())
    result = _solve("--run_dir", "no_such_run", "--instances", x)
    assert result.exit_code == 1 and "no run directory" in result.output
    result = _solve("--run_dir", tiny_run, "--instances", x, "--checkpoint", "9")
    assert result.exit_code == 1 and "no checkpoint for epoch 9" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _solve("--run_dir", empty / ".." / "empty", "--instances", x)  # a path, not a name: used as given
    assert result.exit_code == 1 and "no config.json" in result.output


def test_eval_json_report(tiny_run):
    args = ["--run_dir", str(tiny_run), "--num_instances", "6", "--num_loc", "12", "--reference", "2opt",
            "--num_samples", "2", "--json"]  # fmt: skip
    result = CliRunner().invoke(eval_cli.main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["reference"]["solver"] == "nearest neighbour + 2-opt"
    assert set(report["modes"]) == {"greedy", "greedy x8", "sample (best of 2)", "multistart", "multistart x8"}
    for mode in report["modes"].values():
        assert mode["mean_length"] > 0 and mode["seconds_per_instance"] > 0


def test_eval_text_report_on_another_distribution(tiny_run):
    args = ["--run_dir", str(tiny_run), "--num_instances", "4", "--distribution", "clustered", "--reference", "2opt"]
    result = CliRunner().invoke(eval_cli.main, args)
    assert result.exit_code == 0, result.output
    assert "clustered TSP10" in result.output and "multistart x8" in result.output
