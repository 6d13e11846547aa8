"""clt.run_queue: queued command lines (clt.train_transcoder runs), claimed one at a time, run in one process."""

import json
from pathlib import Path

from click.testing import CliRunner
from safetensors.torch import load_file

from clt import run_queue
from clt import train_transcoder as train_cli

PAIR = "clt_L0.mlp_in_to_L0.mlp_out"


def _args(run_dir, k, *extra):
    return ["clt.train_transcoder", "--run_dir", str(run_dir), "--pair", PAIR, "--expansion_factor", "2", "--k",
            str(k), "--batch_size", "64", "--num_epochs", "1", "--wandb_mode", "disabled", *extra]  # fmt: skip


def _queue(folder: Path, runs: list[list[str]]) -> Path:
    folder.mkdir()
    for i, args in enumerate(runs):
        (folder / f"{i:06d}.args").write_bytes(b"".join(a.encode() + b"\0" for a in args))
    return folder


def _runs(run_dir):  # the finished ones
    return sorted(f for f in (run_dir / "clt" / "clt_runs" / PAIR).iterdir() if (f / "model.safetensors").is_file())


def test_queued_runs_train_as_their_own_processes_would_and_a_failure_spares_the_others(pair_run, tmp_path):
    alone = CliRunner().invoke(train_cli.main, _args(pair_run, 3, "--wandb_run_name", "")[1:])
    assert alone.exit_code == 0, alone.output
    reference = load_file(_runs(pair_run)[-1] / "model.safetensors")
    queue = _queue(tmp_path / "queue", [_args(pair_run, 3, "--wandb_run_name", ""), _args(pair_run, 99),
                                        _args(pair_run, 2, "--sweep", "queued")])  # fmt: skip
    result = CliRunner().invoke(run_queue.main, [str(queue)])
    assert result.exit_code == 1 and "1 line(s) failed: 000001.args" in result.output, result.output
    assert "99" in result.output  # the failed run's own error
    first, last = _runs(pair_run)[-2:]
    weights = load_file(first / "model.safetensors")
    assert weights.keys() == reference.keys() and all((weights[k] == reference[k]).all() for k in weights)
    assert json.loads((pair_run / "clt" / "sweeps" / "queued.json").read_text())["runs"] == [
        str(last.relative_to(pair_run))
    ]
    assert not list(queue.glob("*.args"))  # all claimed
    again = CliRunner().invoke(run_queue.main, [str(queue)])
    assert again.exit_code == 0 and len(_runs(pair_run)) == 3  # nothing left to train


def test_a_claimed_run_is_not_claimed_again(tmp_path):
    queue = _queue(tmp_path / "queue", [["--a", ""], ["--b"]])
    first, second = run_queue.claim(queue), run_queue.claim(queue)
    assert first[1] == ["--a", ""] and second[1] == ["--b"] and run_queue.claim(queue) is None
    missing = CliRunner().invoke(run_queue.main, [str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "is not a folder of queued command lines" in missing.output
    others = _queue(tmp_path / "others", [["os", "--help"], ["clt.model"]])
    refused = CliRunner().invoke(run_queue.main, [str(others)])
    assert refused.exit_code == 1 and "'os' is not a command of this project" in refused.output
    assert "clt.model has no command-line entry point" in refused.output
