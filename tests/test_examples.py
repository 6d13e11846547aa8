"""examples/: each script runs on the analysed tiny run (an SAE on encoder_layer_0, mlp transcoders on both layers)."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=300)


def test_inspect_feature_reports_firing_writes_and_removal(analysed_run):
    out = run_example("inspect_feature.py", "--run_dir", str(analysed_run), "--pair", "clt_L0.mlp_in_to_L0.mlp_out",
                      "--num_instances", "30")  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert re.search(r"feature #\d+ on 30 fresh instances", text)
    assert re.search(r"fires on \d+\.\d% of nodes", text) and "correlation with distance to centre" in text
    assert "writes to encoder_layer_0.mlp_out" in text
    assert "drives clt/clt_L1.mlp_in_to_L1.mlp_out" in text and "drives clt/clt_multilayer/L1" in text
    removal = re.search(r"removing it: mean tour ([\d.]+) -> ([\d.]+) .* greedy actions kept ([\d.]+)%", text)
    assert removal and 0 <= float(removal.group(3)) <= 100


def test_inspect_feature_rejects_an_untrained_pair_and_a_bad_index(analysed_run):
    out = run_example("inspect_feature.py", "--run_dir", str(analysed_run), "--pair", "clt_L0_to_L1")
    assert out.returncode == 2 and "no trained transcoder for clt_L0_to_L1" in out.stderr
    out = run_example("inspect_feature.py", "--run_dir", str(analysed_run), "--pair", "clt_L0.mlp_in_to_L0.mlp_out",
                      "--feature", "9999", "--num_instances", "5")  # fmt: skip
    assert out.returncode == 2 and "--feature must be in [0, 32)" in out.stderr


def test_sae_to_clt_scores_paths_by_weights_and_by_intervention(analysed_run):
    out = run_example("sae_to_clt.py", "--run_dir", str(analysed_run), "--paths", "4", "--num_instances", "30")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if re.match(r"^\s+\d+\s+\d+\s", line)]
    assert len(rows) == 4
    scores = [abs(float(r[2])) for r in rows]
    assert scores == sorted(scores, reverse=True)
    for r in rows:  # predicted change = -(path score / |decoder row|) has the opposite sign of the path score
        assert float(r[4]) * float(r[2]) <= 0
    assert re.search(r"predict the sign of the measured change on \d+% of these paths", out.stdout)


def test_sae_to_clt_needs_the_sae_upstream_of_the_transcoder(analysed_run):
    out = run_example("sae_to_clt.py", "--run_dir", str(analysed_run), "--pair", "clt_L0.mlp_in_to_L0.mlp_out")
    assert out.returncode == 2 and "is not upstream of encoder_layer_0.mlp_in" in out.stderr


def test_decisions_summarises_the_graphs_of_several_decisions(analysed_run):
    out = run_example("decisions.py", "--run_dir", str(analysed_run), "--instances", "2", "--steps", "1,5",
                      "--verify", "4")  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("seed")]
    assert len(rows) == 4
    mean = out.stdout.splitlines()[-1]
    assert mean.startswith("mean of 4")
    replacement, completeness, error = (float(v) for v in mean.split()[3:6])
    assert 0 < replacement <= 1 and 0 < completeness <= 1 and error < 1e-8
    out = run_example("decisions.py", "--run_dir", str(analysed_run), "--steps", "9")
    assert out.returncode != 0 and "steps must lie in 0..8" in out.stderr
