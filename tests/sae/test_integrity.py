"""Dumps and run folders under concurrency, crashes and hostile layouts: owned while written, preallocated,
published together, registered portably, and never mistaken for complete."""

import errno
import json
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from policy.runs import new_run_folder, resume_folder
from sae import collect_activations, train_topk
from sae import store as store_mod
from sae.registry import read_registry, register_dataset, registered_dump
from sae.store import DumpWriter, open_dump


def _fill(writer, rows, seed):
    values = np.full((rows, 2), float(seed), np.float32)
    writer.write({"a": values})
    writer.finish({"seed": seed})


def test_a_second_writer_waits_for_the_first(tmp_path):
    """Another process that wants the dump waits until the first writer has published it."""
    path = tmp_path / "d"
    first = DumpWriter(path, {"a": 2}, 4)
    code = ("import sys; from sae.store import dump_lock, open_dump\n"
            "with dump_lock(sys.argv[1]): print(open_dump(sys.argv[1]).metadata['seed'])")  # fmt: skip
    second = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert second.poll() is None, "the second process must wait while the first one writes"
    _fill(first, 4, 1)
    out, _ = second.communicate(timeout=30)
    assert second.returncode == 0 and out.strip() == "1"  # it saw the first one's complete dump


def test_a_stale_partial_of_a_dead_writer_is_replaced(tmp_path):
    path = tmp_path / "d"
    (tmp_path / "d.partial").mkdir()
    (tmp_path / "d.partial" / "a.npy").write_bytes(b"left by kill -9")
    with DumpWriter(path, {"a": 2}, 3) as writer:
        _fill(writer, 3, 7)
    assert open_dump(path, verify="always").metadata["seed"] == 7 and not (tmp_path / "d.partial").exists()


def test_not_enough_space_is_an_error_before_any_row(tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(OSError, match=r"needs 0.1 MiB, 0.0 MiB are free"):
        DumpWriter(tmp_path / "d", {"a": 64}, 400)
    assert not (tmp_path / "d.partial").exists()


def test_a_failed_preallocation_removes_the_partial(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.os, "posix_fallocate", full)
    with pytest.raises(OSError, match="disk full while reserving"):
        DumpWriter(tmp_path / "d", {"a": 4}, 10)
    assert not (tmp_path / "d.partial").exists()


def test_a_full_disk_stops_collection_with_one_line_and_no_partial(tiny_run, tmpfs):
    root = tmpfs("64k")
    args = ["--run_dir", str(tiny_run), "--num_instances", "400", "--name", "big", "--activations_root", str(root)]
    result = CliRunner().invoke(collect_activations.main, args)
    assert result.exit_code == 1 and "not enough disk space for the dump" in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not any(p.name.endswith(".partial") for p in root.rglob("*"))
    assert "big" not in read_registry(tiny_run)


def test_files_in_fortran_order_are_refused(tmp_path):
    path = tmp_path / "d"
    with DumpWriter(path, {"a": 3}, 4) as writer:
        _fill_3 = np.arange(12, dtype=np.float32).reshape(4, 3)
        writer.write({"a": _fill_3})
        writer.finish({})
    np.save(path / "a.npy", np.asfortranarray(np.load(path / "a.npy")))
    with pytest.raises(ValueError, match="Fortran"):
        open_dump(path)


def test_overwriting_a_symlinked_dump_writes_where_the_link_points(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    with DumpWriter(real, {"a": 2}, 2) as writer:
        _fill(writer, 2, 1)
    link.symlink_to(real)
    with DumpWriter(link, {"a": 2}, 2, overwrite=True) as writer:
        _fill(writer, 2, 2)
    assert link.is_symlink() and open_dump(link, verify="always").metadata["seed"] == 2
    assert open_dump(real).metadata["seed"] == 2


def test_in_run_dumps_are_registered_relative_and_external_ones_absolute(tmp_path):
    run, external = tmp_path / "run", tmp_path / "ext" / "d"
    register_dataset(run, "inside", run / "sae" / "activations" / "inside")
    register_dataset(run, "outside", external)
    stored = json.loads((run / "sae" / "activation_store.json").read_text())
    assert stored["inside"]["path"] == "sae/activations/inside"
    assert stored["outside"]["path"] == str(external)
    moved = tmp_path / "moved"
    run.rename(moved)
    assert read_registry(moved)["inside"]["path"] == str(moved / "sae" / "activations" / "inside")


def test_a_copied_run_reads_its_own_dumps_and_a_moved_one_finds_them(tiny_run, tmp_path):
    original = tmp_path / "original"
    shutil.copytree(tiny_run, original, ignore=shutil.ignore_patterns("sae", "clt"))
    collect = ["--hooks", "encoder_layer_0", "--num_instances", "20", "--name", "mine"]
    assert CliRunner().invoke(collect_activations.main, ["--run_dir", str(original), *collect]).exit_code == 0
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    assert read_registry(copy)["mine"]["path"] == str(copy / "sae" / "activations" / "mine")
    moved = tmp_path / "moved"
    original.rename(moved)
    train = ["--hook", "encoder_layer_0", "--k", "2", "--expansion_factor", "2", "--num_epochs", "1",
             "--batch_size", "64", "--wandb_mode", "disabled"]  # fmt: skip
    for run in (moved, copy):
        result = CliRunner().invoke(train_topk.main, ["--run_dir", str(run), *train])
        assert result.exit_code == 0, result.output
        out = sorted((run / "sae" / "sae_runs" / "encoder_layer_0").iterdir())[-1]
        assert json.loads((out / "train_cfg.json").read_text())["dataset_path"] == "sae/activations/mine"


def test_dangling_entries_are_named_skipped_and_replaced(tiny_run, tmp_path):
    run, root = tmp_path / "run", tmp_path / "gone"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("sae", "clt"))  # no dumps of other tests
    collect = ["--run_dir", str(run), "--hooks", "encoder_layer_0", "--num_instances", "20", "--name", "ext"]
    assert CliRunner().invoke(collect_activations.main, [*collect, "--activations_root", str(root)]).exit_code == 0
    shutil.rmtree(root)
    train = ["--run_dir", str(run), "--hook", "encoder_layer_0", "--num_epochs", "1", "--wandb_mode", "disabled"]
    named = CliRunner().invoke(train_topk.main, [*train, "--dataset", "ext"])
    assert named.exit_code == 1 and "which no longer exists" in named.output, named.output
    newest = CliRunner().invoke(train_topk.main, train)
    assert newest.exit_code == 1 and "no registered activation dump" in newest.output, newest.output
    assert not (run / "sae" / "sae_runs").exists()  # runs that cannot start leave no (empty) run folders
    assert CliRunner().invoke(collect_activations.main, collect).exit_code == 0  # in the run this time
    assert read_registry(run)["ext"]["path"] == str(run / "sae" / "activations" / "ext")
    assert CliRunner().invoke(train_topk.main, [*train, "--dataset", "ext", "--k", "2"]).exit_code == 0


def test_a_dump_replaced_by_another_collection_is_refused(tmp_path):
    run = tmp_path / "run"
    path = run / "sae" / "activations" / "d"
    with DumpWriter(path, {"a": 2}, 2) as writer:
        _fill(writer, 2, 1)
    register_dataset(run, "d", path)
    entry = read_registry(run)["d"]
    registered_dump(run, "d", entry)
    meta = json.loads((path / "metadata.json").read_text())
    (path / "metadata.json").write_text(json.dumps({**meta, "collection_id": "another"}))
    entry["collection_id"] = "the registered one"
    with pytest.raises(ValueError, match="written by another collection"):
        registered_dump(run, "d", entry)


def test_run_folders_made_at_once_are_all_distinct(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")  # every caller in the same second
    made, threads = [], []
    for _ in range(8):
        threads.append(threading.Thread(target=lambda: made.append(new_run_folder(tmp_path / "runs"))))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8 and all(p.is_dir() for p in made)
    assert sorted(made)[-1].name == "20260101-000000_007"


def test_resume_never_continues_an_older_run(tmp_path):
    older, newest = tmp_path / "20260101-000000", tmp_path / "20260101-000001"
    (older / "checkpoints").mkdir(parents=True)
    (older / "checkpoints" / "train_state.pt").write_bytes(b"")
    newest.mkdir()
    (newest / "train_cfg.json").write_text("{}")  # started, killed before its first save
    with pytest.raises(FileNotFoundError, match="newest run .*000001 has no saved training state"):
        resume_folder(tmp_path)
    (newest / "train_cfg.json").unlink()  # empty: a start refused before it wrote anything
    assert resume_folder(tmp_path) == older


def test_re_pointing_an_entry_to_another_root_is_said(tmp_path, caplog):
    run = tmp_path / "run"
    register_dataset(run, "d", tmp_path / "root_a" / "d")
    with caplog.at_level("WARNING"):
        register_dataset(run, "d", tmp_path / "root_a" / "d")  # the same place: nothing to say
        assert not caplog.records
        register_dataset(run, "d", tmp_path / "root_b" / "d")
    assert "now points to" in caplog.text and "root_b" in caplog.text and "root_a" in caplog.text
