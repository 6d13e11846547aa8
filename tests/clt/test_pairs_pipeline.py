"""clt data pipeline: pair names and checks, collect_pairs, PairDataset, inspect_pairs."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clt import collect_pairs as collect_cli
from clt import inspect_pairs as inspect_cli
from clt import list_pairs as list_pairs_cli
from clt.datasets import PairDataset, open_pair
from clt.normalization import Normalizer
from clt.pairs import LayerPair, parse_pairs, read_pairs_config
from policy.env import generate
from policy.loading import load_policy
from sae.hooks import HookedPolicy
from sae.registry import read_registry
from sae.store import DumpWriter, NonFiniteRows

PAIRS = "encoder_layer_0:encoder_layer_1,encoder_layer_1:encoder_output,encoder_layer_1.mlp_in:encoder_layer_1.mlp_out"


@pytest.fixture(scope="module")
def pairs_run(tiny_source, tmp_path_factory):
    """A copy of the tiny run with PAIRS collected."""
    run_dir = tmp_path_factory.mktemp("pairs") / "tiny"
    shutil.copytree(tiny_source, run_dir)
    args = ["--run_dir", str(run_dir), "--layer_pairs", PAIRS, "--num_instances_per_pair", "40", "--batch_size", "16"]
    result = CliRunner().invoke(collect_cli.main, args)
    assert result.exit_code == 0, result.output
    return run_dir


def _dir(run, pair):
    return run / "clt" / "activations" / pair


def test_canonical_names():
    assert LayerPair("encoder_layer_0", "encoder_layer_2").name == "clt_L0_to_L2"
    assert LayerPair("encoder_layer_1.mlp_in", "encoder_layer_1.mlp_out").name == "clt_L1.mlp_in_to_L1.mlp_out"
    assert LayerPair("encoder_layer_1", "encoder_output").name == "clt_L1_to_out"
    assert LayerPair("encoder_layer_0", "encoder_layer_2").source_tensor == "source_encoder_layer_0"


def test_pair_checks(tiny_model):
    names = HookedPolicy(tiny_model).hook_names()
    with pytest.raises(ValueError, match="unknown hook 'encoder_layer_9'"):
        parse_pairs("encoder_layer_0:encoder_layer_9", names)
    with pytest.raises(ValueError, match="not downstream"):
        parse_pairs("encoder_layer_1:encoder_layer_0", names)
    with pytest.raises(ValueError, match="mixes an encoder point"):
        parse_pairs("encoder_layer_0:decoder.glimpse", names)
    with pytest.raises(ValueError, match="source:target"):
        parse_pairs("encoder_layer_0", names)
    assert len(parse_pairs(["encoder_layer_0:encoder_output"], names)) == 1


def test_list_pairs_prints_a_configs_pair_names_and_grids_and_refuses_a_malformed_entry(tmp_path):
    config = tmp_path / "pairs.json"
    config.write_text(json.dumps({"layer_pairs": [" encoder_layer_0 : encoder_layer_2", "encoder_layer_1.mlp_in:"
                                                  "encoder_layer_1.mlp_out"], "sparsity": {"k": [8, 16]}}))  # fmt: skip
    result = CliRunner().invoke(list_pairs_cli.main, [str(config)])
    assert result.exit_code == 0 and result.output == "clt_L0_to_L2\nclt_L1.mlp_in_to_L1.mlp_out\n"
    result = CliRunner().invoke(list_pairs_cli.main, [str(config), "--grids"])
    assert result.output.splitlines() == ["clt_L0_to_L2 clt_L1.mlp_in_to_L1.mlp_out", "8", "8 16", ""]
    config.write_text(json.dumps({"layer_pairs": ["encoder_layer_0:encoder_layer_1:encoder_layer_2"]}))
    result = CliRunner().invoke(list_pairs_cli.main, [str(config)])
    assert result.exit_code == 1 and "a layer pair is 'source:target'" in result.output
    assert "Traceback" not in result.output


def test_list_pairs_prints_a_runs_default_pairs_without_a_config(tiny_run):
    result = CliRunner().invoke(list_pairs_cli.main, ["--run_dir", str(tiny_run), "--grids"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "clt_L0.mlp_in_to_L0.mlp_out clt_L1.mlp_in_to_L1.mlp_out clt_L0_to_L1"
    neither = CliRunner().invoke(list_pairs_cli.main, [])
    assert neither.exit_code == 1 and "give one of a pairs CONFIG file and --run_dir" in neither.output


def test_shipped_demo_config():
    cfg = read_pairs_config("clt/configs/tsp20_demo.json")
    assert "encoder_layer_0:encoder_layer_2" in cfg.layer_pairs
    assert all(f"encoder_layer_{i}.mlp_in:encoder_layer_{i}.mlp_out" in cfg.layer_pairs for i in range(3))


def test_rows_are_the_same_nodes_in_every_pair(pairs_run):
    a = open_pair(_dir(pairs_run, "clt_L0_to_L1"), verify="always")
    b = open_pair(_dir(pairs_run, "clt_L1_to_out"))
    np.testing.assert_array_equal(a.arrays["targets"], b.arrays["sources"])
    np.testing.assert_array_equal(a.arrays["targets"], b.arrays["targets"])  # the last layer's output is the encoder's
    assert a.metadata["tensors"] == {"sources": "source_encoder_layer_0", "targets": "target_encoder_layer_1"}
    assert a.rows == 400 and a.metadata["checkpoint_sha256"]
    locs = torch.from_numpy(np.load(a.path / "locs.npy"))
    cache = HookedPolicy(load_policy(pairs_run).model).run_with_cache(locs, ["encoder_layer_0"])
    np.testing.assert_allclose(a.arrays["sources"], cache["encoder_layer_0"].reshape(400, -1).numpy(), atol=1e-6)
    assert {"clt_L0_to_L1", "clt_L1_to_out", "clt_L1.mlp_in_to_L1.mlp_out"} <= set(read_registry(pairs_run))


def test_a_run_without_a_config_collects_the_default_pairs(tiny_run):
    """No config file and no --layer_pairs (an imported model, say): every layer's mlp_in -> mlp_out, then each
    layer's output -> the next's."""
    args = ["--run_dir", str(tiny_run), "--num_instances_per_pair", "8", "--batch_size", "8"]
    result = CliRunner().invoke(collect_cli.main, args)
    assert result.exit_code == 0, result.output
    expected = {"clt_L0.mlp_in_to_L0.mlp_out", "clt_L1.mlp_in_to_L1.mlp_out", "clt_L0_to_L1"}
    assert expected == {p.name for p in (tiny_run / "clt" / "activations").iterdir() if p.is_dir()}


def test_bad_pairs_leave_nothing_behind(tiny_run):
    result = CliRunner().invoke(
        collect_cli.main, ["--run_dir", str(tiny_run), "--layer_pairs", "encoder_layer_1:encoder_layer_0"]
    )
    assert result.exit_code == 1 and "not downstream" in result.output
    assert not _dir(tiny_run, "clt_L1_to_L0").exists()


def test_nan_activations_stop_the_collection_cleanly(tiny_run, tmp_path, monkeypatch):
    import sae.collect_activations as collector

    real = collector.HookedPolicy.run_with_cache

    def poisoned(self, locs, names, **kw):
        cache = real(self, locs, names, **kw)
        return {k: v.clone().fill_(float("nan")) for k, v in cache.items()}

    monkeypatch.setattr(collector.HookedPolicy, "run_with_cache", poisoned)
    args = ["--run_dir", str(tiny_run), "--layer_pairs", "encoder_layer_0:encoder_output",
            "--num_instances_per_pair", "8", "--activations_root", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(collect_cli.main, args)
    assert result.exit_code == 1 and "NaN or Inf" in result.output
    assert not any(tmp_path.rglob("metadata.json")) and not any(tmp_path.rglob("*.partial"))


def test_unequal_rows_and_nonfinite_stats_are_refused(tmp_path):
    with DumpWriter(tmp_path / "p", {"sources": 2, "targets": 2}, 4) as w:
        with pytest.raises(NonFiniteRows, match="NaN or Inf in the rows of targets"):
            w.write({"sources": np.ones((4, 2), np.float32), "targets": np.full((4, 2), np.inf, np.float32)})
        w.write({"sources": np.ones((4, 2), np.float32), "targets": np.ones((4, 2), np.float32)})
        w.finish({"num_instances": 2, "nodes_per_instance": 2})
    meta = json.loads((tmp_path / "p" / "metadata.json").read_text())
    meta["arrays"]["targets"]["std"] = [float("inf"), 1.0]  # statistics written by something else
    (tmp_path / "p" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="metadata.json: arrays.targets.std must hold 2 finite numbers"):
        open_pair(tmp_path / "p")
    np.save(tmp_path / "p" / "targets.npy", np.zeros((3, 2), np.float32))  # a consistent file with fewer rows
    meta = json.loads((tmp_path / "p" / "metadata.json").read_text())
    meta["arrays"]["targets"].update(shape=[3, 2], mean=[0.0, 0.0], std=[1.0, 1.0])
    (tmp_path / "p" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="metadata.json: arrays.targets has 3 rows, the dump 4"):
        open_pair(tmp_path / "p")
    meta["arrays"]["targets"]["shape"] = [4, 2]
    (tmp_path / "p" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"targets.npy holds float32 \[3, 2\]"):
        open_pair(tmp_path / "p")


def test_dataset_split_determinism_resume_and_shards(pairs_run):
    path = _dir(pairs_run, "clt_L0_to_L1")
    ds = PairDataset(path, batch_size=32, val_ratio=0.25, seed=3)
    assert not set(ds.train_ids) & set(ds.val_ids) and len(ds.val_ids) == 10
    train_rows = set((ds.train_ids[:, None] * 10 + np.arange(10)).ravel())
    first = list(ds.train_batches(0))
    again = list(PairDataset(path, batch_size=32, val_ratio=0.25, seed=3).train_batches(0))
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    tail = list(ds.train_batches(0, start_step=4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[4:], tail, strict=True))
    sources = np.asarray(ds.dump.arrays["sources"])
    seen = torch.cat([x for x, _ in first]).numpy()
    assert seen.shape[0] == len(train_rows)
    rows = {int(np.flatnonzero((sources == row).all(1))[0]) for row in seen[:20]}
    assert rows <= train_rows
    shards = [PairDataset(path, batch_size=32, val_ratio=0.25, seed=3, rank=r, world_size=2) for r in range(2)]
    for (x, _), (x0, _), (x1, _) in zip(first, shards[0].train_batches(0), shards[1].train_batches(0), strict=True):
        assert torch.equal(torch.cat([x0, x1]), x)


def test_normalisation_round_trip(pairs_run):
    path = _dir(pairs_run, "clt_L0_to_L1")
    raw = PairDataset(path, batch_size=64, seed=0)
    std = PairDataset(path, batch_size=64, seed=0, normalize_source="standard", normalize_target="center")
    (xr, yr), (xs, yc) = next(raw.train_batches(0)), next(std.train_batches(0))
    torch.testing.assert_close(std.source_norm.inverse(xs), xr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std.target_norm.inverse(yc), yr, atol=1e-5, rtol=1e-5)
    allx = torch.cat([x for x, _ in std.train_batches(0)] + [x for x, _ in std.val_batches()])
    torch.testing.assert_close(allx.mean(0), torch.zeros(allx.shape[1]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="normalisation"):
        Normalizer("whiten", torch.zeros(2), torch.ones(2))


def test_inspect_pairs_table_json_and_a_ridge_baseline(pairs_run):
    result = CliRunner().invoke(inspect_cli.main, ["--run_dir", str(pairs_run), "--json"])
    assert result.exit_code == 0, result.output
    reports = {r["pair"]: r for r in json.loads(result.output)}
    assert {"clt_L0_to_L1", "clt_L1.mlp_in_to_L1.mlp_out"} <= set(reports)
    r = reports["clt_L1.mlp_in_to_L1.mlp_out"]
    assert r["rows"] == 400 and r["instances"] == 40
    assert 1 <= r["sources"]["effective_rank"] <= 16 and 0 <= r["mean_abs_correlation"] <= 1
    assert r["ridge"]["r2"] == pytest.approx(1 - r["ridge"]["fvu"])
    table = CliRunner().invoke(inspect_cli.main, ["--run_dir", str(pairs_run), "--pair", "clt_L0_to_L1"])
    assert table.exit_code == 0 and "ridge FVU" in table.output and "clt_L0_to_L1" in table.output


def test_ridge_recovers_an_exact_linear_map(tmp_path):
    """inspect_pair's ridge, and pair_ridge (the trainer's, computed alone) equal to it, on an exact and a noisy map."""
    from clt.pair_stats import inspect_pair, pair_ridge
    from sae.store import open_dump

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5)).astype(np.float32)
    y = (x @ rng.normal(size=(5, 3)) + 0.5).astype(np.float32)
    noisy = y + rng.normal(size=y.shape).astype(np.float32)
    for name, target in (("lin", y), ("noisy", noisy)):
        with DumpWriter(tmp_path / name, {"sources": 5, "targets": 3}, 600) as w:
            w.write({"sources": x, "targets": target})
            w.finish({"num_instances": 60, "nodes_per_instance": 10})
    assert inspect_pair(open_dump(tmp_path / "lin"))["ridge"]["fvu"] < 1e-4
    for seed in (0, 3):
        report = inspect_pair(open_dump(tmp_path / "noisy"), val_ratio=0.2, seed=seed)
        assert pair_ridge(open_dump(tmp_path / "noisy"), val_ratio=0.2, seed=seed) == report["ridge"]
        assert 0.01 < report["ridge"]["fvu"] < 1


def test_the_ridge_is_fitted_once_per_dump_content_and_split(tmp_path, monkeypatch):
    from clt import pair_stats
    from sae.store import open_dump

    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 4)).astype(np.float32)
    fits = []
    fit = pair_stats._fit_pair_ridge
    monkeypatch.setattr(pair_stats, "_fit_pair_ridge", lambda *args: fits.append(args[1:]) or fit(*args))
    results = []
    for scale in (1.0, 3.0):  # the second collection overwrites the first with other targets
        with DumpWriter(tmp_path / "d", {"sources": 4, "targets": 2}, 400, overwrite=True) as w:
            w.write({"sources": x, "targets": x[:, :2] * scale + rng.normal(size=(400, 2)).astype(np.float32)})
            w.finish({"num_instances": 40, "nodes_per_instance": 10})
        results += [pair_stats.pair_ridge(open_dump(tmp_path / "d"), 0.2, seed) for seed in (0, 0, 1)]
    assert fits == [(0.2, 0), (0.2, 1)] * 2  # the same dump and split: fitted once; a new collection: again
    assert results[0] == results[1] != results[3] and results[0] is not results[1]


def test_generated_locs_are_in_every_pair(pairs_run):
    a = np.load(_dir(pairs_run, "clt_L0_to_L1") / "locs.npy")
    assert a.shape == (40, 10, 2)
    assert np.array_equal(a[:3], generate(40, 10, "uniform", seed=0 * 1_000_003).numpy()[:3])


def test_inspect_pairs_names_nan_rows(pairs_run, tmp_path, reseal):
    import shutil

    broken = tmp_path / "tiny"
    shutil.copytree(pairs_run, broken)
    targets = np.load(broken / "clt" / "activations" / "clt_L0_to_L1" / "targets.npy", mmap_mode="r+")
    targets[13, 0] = np.nan  # the stored statistics stay finite: only reading the rows finds it
    targets.flush()
    reseal(broken / "clt" / "activations" / "clt_L0_to_L1")  # checksums match too
    result = CliRunner().invoke(inspect_cli.main, ["--run_dir", str(broken), "--pair", "clt_L0_to_L1"])
    assert result.exit_code == 1 and "NaN or Inf in targets (first at row 13)" in result.output, result.output


def test_a_pair_collected_under_another_condition_gets_its_own_dump_and_training_chooses(tiny_run, tmp_path,
                                                                                         caplog):  # fmt: skip
    import shutil

    from clt import train_transcoder as train_cli

    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("sae", "clt"))
    base = ["--run_dir", str(run), "--layer_pairs", "encoder_layer_0:encoder_layer_1", "--num_instances_per_pair", "20"]
    conditions = {(): "clt_L0_to_L1", ("--distribution", "clustered"): "clt_L0_to_L1__clustered_n10_e1_seed0",
                  ("--num_loc", "12"): "clt_L0_to_L1__uniform_n12_e1_seed0",
                  ("--seed", "3"): "clt_L0_to_L1__uniform_n10_e1_seed3"}  # fmt: skip
    for extra, name in conditions.items():
        result = CliRunner().invoke(collect_cli.main, [*base, *extra])
        assert result.exit_code == 0 and f"{name}: " in result.output, result.output
    registry = read_registry(run)
    assert set(conditions.values()) <= set(registry)
    assert registry["clt_L0_to_L1"]["path"] == str(_dir(run, "clt_L0_to_L1"))  # never re-pointed by the others
    assert open_pair(_dir(run, "clt_L0_to_L1__uniform_n12_e1_seed0")).metadata["nodes_per_instance"] == 12
    assert open_pair(_dir(run, "clt_L0_to_L1__clustered_n10_e1_seed0")).metadata["distribution"] == "clustered"
    train = ["--run_dir", str(run), "--pair", "clt_L0_to_L1", "--expansion_factor", "2", "--k", "2", "--batch_size",
             "32", "--num_epochs", "1", "--wandb_mode", "disabled"]  # fmt: skip
    for condition, dump in ((None, "clt_L0_to_L1"), ("clustered_n10_e1_seed0", "clt_L0_to_L1__clustered_n10_e1_seed0")):
        caplog.clear()
        with caplog.at_level("INFO"):
            result = CliRunner().invoke(train_cli.main, [*train, *(["--condition", condition] if condition else [])])
        assert result.exit_code == 0, result.output
        folder = max((run / "clt" / "clt_runs" / "clt_L0_to_L1").iterdir())
        assert json.loads((folder / "train_cfg.json").read_text())["dataset_path"] == f"clt/activations/{dump}"
        assert f"training on {_dir(run, dump)}" in caplog.text  # the trainer names the dump it reads
    missing = CliRunner().invoke(train_cli.main, [*train, "--condition", "mixed_n10_e1_seed0"])
    assert missing.exit_code == 1 and "clt_L0_to_L1__clustered_n10_e1_seed0" in missing.output
