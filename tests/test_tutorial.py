"""docs/guide/tutorial.md runs: its commands, read from the page, at tiny sizes on Kool's TSP20 model (the page uses
their TSP50 one, which is not in the repository)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "guide" / "tutorial.md"
KOOL_TSP20 = ROOT / "tests" / "fixtures" / "kool_am_tsp20"

TINY = {  # per command, the options that make it small (appended: the last value of an option wins in click)
    "policy.import_run": [],
    "clt.collect_pairs": ["--num_instances_per_pair", "24", "--batch_size", "8"],
    "clt.train_transcoder": [
        "--num_epochs",
        "1",
        "--batch_size",
        "64",
        "--expansion_factor",
        "2",
        "--k",
        "4",
        "--wandb_mode",
        "disabled",
    ],
    "clt.eval": ["--num_instances", "4", "--label_instances", "20"],
    "clt.graph.attribute": ["--step", "5", "--verify", "4", "--check_edges", "4"],
}


def tutorial_commands() -> list[list[str]]:
    """The `python -m ...` lines of the tutorial's first bash block, split into arguments."""
    block = re.search(r"```bash\n(.*?)```", TUTORIAL.read_text(), flags=re.S).group(1)
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("python -m ")]


def test_the_tutorials_commands_run_at_tiny_sizes(tmp_path):
    commands = tutorial_commands()
    assert [c[2] for c in commands] == list(TINY), "the tutorial's steps changed: update TINY"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    outputs = []
    for command in commands:
        module = command[2]
        args = [str(KOOL_TSP20) if a == "../shared/fixtures/kool_am_tsp50" else a for a in command[3:]]
        result = subprocess.run([sys.executable, "-m", module, *args, *TINY[module]], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, f"{module}: {result.stderr[-3000:]}"
        outputs.append(result.stdout)
    run = tmp_path / "runs" / "kool_tsp50"
    assert (run / "config.json").is_file() and json.loads((run / "config.json").read_text())["env"]["num_loc"] == 20
    clt = next((run / "clt" / "clt_runs" / "clt_multilayer").iterdir())
    assert (clt / "eval" / "metrics.json").is_file() and (clt / "eval" / "labels.json").is_file()
    summary = outputs[-1]
    for line in ("the policy picks", "patched removal effects", "edges: the", "circuit: the margin", "in words:"):
        assert line in summary, f"{line!r} missing from the attribution summary:\n{summary}"
    assert list((run / "clt" / "attribution").glob("seed900100_*_step5_*.json"))
