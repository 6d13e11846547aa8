"""The transcoder and SAE pipeline on CUDA: collect_pairs and sae.collect_activations with --device cuda write the
CPU's activations, training steps of every sparsifier give the CPU's losses and weights, and clt.train_transcoder and
sae.train_topk with --device cuda reach the CPU's validation FVU and write weights that load on the CPU. Skipped
without a CUDA device."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clt import collect_pairs as collect_cli
from clt import train_transcoder as train_cli
from clt.config import ACTIVATIONS
from clt.model import CrossLayerTranscoder, TranscoderConfig, load_transcoder
from clt.train_transcoder import train_step
from sae import collect_activations
from sae import train_topk as sae_train_cli
from sae.model import load_sae

DEVICE = "cuda"
PAIR = "clt_L0.mlp_in_to_L0.mlp_out"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def collected(tiny_source, tmp_path_factory) -> dict[str, Path]:
    """A copy of the tiny run per device, each with a pair and an SAE dump collected on that device."""
    runs = {}
    for device in ("cpu", DEVICE):
        run_dir = tmp_path_factory.mktemp(device) / "tiny"
        shutil.copytree(tiny_source, run_dir)
        steps = [
            (collect_cli.main, ["--layer_pairs", "encoder_layer_0.mlp_in:encoder_layer_0.mlp_out",
                                "--num_instances_per_pair", "60", "--batch_size", "32"]),
            (collect_activations.main, ["--hooks", "encoder_layer_1", "--num_instances", "60", "--name", "sae_data"]),
        ]  # fmt: skip
        for cli, args in steps:
            result = CliRunner().invoke(cli, ["--run_dir", str(run_dir), "--device", device, *args])
            assert result.exit_code == 0, result.output
        runs[device] = run_dir
    return runs


def _arrays(run_dir: Path) -> dict[str, np.ndarray]:
    files = [p for folder in ("clt", "sae") for p in (run_dir / folder).rglob("*.npy")]
    return {str(p.relative_to(run_dir)): np.load(p) for p in files}


def test_collection_on_cuda_writes_the_cpus_activations(collected):
    cpu, cuda = _arrays(collected["cpu"]), _arrays(collected[DEVICE])
    assert cpu.keys() == cuda.keys() and len(cpu) >= 3
    for name, expected in cpu.items():
        np.testing.assert_allclose(cuda[name], expected, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_training_steps_on_cuda_match_the_cpu(activation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 6, generator=g))
    after = {}
    for device in ("cpu", DEVICE):
        torch.manual_seed(0)
        cfg = TranscoderConfig(d_in=8, d_out=6, expansion_factor=4, k=3, activation=activation, dead_tokens=256)
        model = CrossLayerTranscoder(cfg).to(device)
        xd, yd = x.to(device), y.to(device)
        model.set_statistics(xd.mean(0), xd.std(0), yd.mean(0), yd.std(0))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        rows_since_fired = torch.zeros(cfg.n_features, dtype=torch.long, device=device)
        halves = (slice(0, 128), slice(128, 256)) * 2  # 4 steps: AuxK starts once no feature fired in 256 rows
        stats = [train_step(model, opt, xd[rows], yd[rows], rows_since_fired) for rows in halves]
        after[device] = stats, {k: v.cpu() for k, v in model.state_dict().items()}, rows_since_fired.cpu()
    (stats_cpu, weights_cpu, fired_cpu), (stats_cuda, weights_cuda, fired_cuda) = after["cpu"], after[DEVICE]
    for a, b in zip(stats_cpu, stats_cuda, strict=True):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-5)
    for name, expected in weights_cpu.items():
        torch.testing.assert_close(weights_cuda[name], expected, rtol=1e-3, atol=1e-4, msg=name)
    assert torch.equal(fired_cuda, fired_cpu)


def _final_val_fvu(folder: Path) -> float:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val/fvu" in r][-1]["val/fvu"]


def test_trainers_on_cuda_reach_the_cpus_fvu_and_their_weights_load_on_the_cpu(collected):
    common = ["--batch_size", "64", "--num_epochs", "3", "--wandb_mode", "disabled"]
    fvus = {"clt": {}, "sae": {}}
    for device, run_dir in collected.items():
        clt_args = ["--run_dir", str(run_dir), "--pair", PAIR, "--expansion_factor", "4", "--k", "4", *common]
        sae_args = ["--run_dir", str(run_dir), "--hook", "encoder_layer_1", "--dataset", "sae_data",
                    "--expansion_factor", "2", "--k", "4", "--lr", "3e-3", *common]  # fmt: skip
        for kind, cli, args, runs in (("clt", train_cli.main, clt_args, run_dir / "clt" / "clt_runs" / PAIR),
                                      ("sae", sae_train_cli.main, sae_args, run_dir / "sae" / "sae_runs" /
                                       "encoder_layer_1")):  # fmt: skip
            result = CliRunner().invoke(cli, [*args, "--device", device])
            assert result.exit_code == 0, result.output
            folder = sorted(runs.iterdir())[-1]
            model = load_transcoder(folder) if kind == "clt" else load_sae(folder)
            assert {p.device.type for p in model.parameters()} == {"cpu"}
            fvus[kind][device] = _final_val_fvu(folder)
    for kind, by_device in fvus.items():
        assert by_device[DEVICE] == pytest.approx(by_device["cpu"], abs=0.02), kind
        assert by_device["cpu"] < 1, kind
