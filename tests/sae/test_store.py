"""Dumps: streamed stats, complete-or-absent, clear errors for damaged files."""

import json

import numpy as np
import pytest

from sae.store import DumpWriter, RunningStats, open_dump


def _write(path, rows=50, dims=None, dtype="float32", chunk=7, seed=0):
    dims = dims or {"a": 4, "b": 3}
    rng = np.random.default_rng(seed)
    data = {k: rng.normal(2.0, 3.0, size=(rows, d)).astype(np.float32) for k, d in dims.items()}
    with DumpWriter(path, dims, rows, dtype) as writer:
        for start in range(0, rows, chunk):
            writer.write({k: v[start : start + chunk] for k, v in data.items()})
        writer.finish({"nodes_per_instance": 5, "num_instances": rows // 5})
    return data


def test_round_trip_with_streamed_stats(tmp_path):
    data = _write(tmp_path / "d")
    dump = open_dump(tmp_path / "d", verify="always")
    for name, values in data.items():
        np.testing.assert_array_equal(dump.arrays[name], values)
        mean, std = dump.stats(name)
        np.testing.assert_allclose(mean, values.mean(0), rtol=1e-5)
        np.testing.assert_allclose(std, values.std(0), rtol=1e-5)
        np.testing.assert_allclose(dump.covariance(name), np.cov(values.T.astype(np.float64), bias=True), rtol=1e-5)
    assert dump.rows == 50 and dump.metadata["dtype"] == "float32"
    assert set(dump.metadata["sha256"]) == {"a.npy", "b.npy", "a_covariance.npy", "b_covariance.npy"}


def test_rows_accepted_ahead_are_stored_in_order(tmp_path):
    """accept places batches ahead of store (as sae.collection_loop does, one batch ahead); a batch stored out of turn
    or accepted past the end is refused, and the finished dump equals one written with `write`."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(10, 3)).astype(np.float32)
    with DumpWriter(tmp_path / "d", {"a": 3}, 10) as writer:
        first, second = writer.accept({"a": data[:4]}), writer.accept({"a": data[4:]})
        assert (first.start, first.count, second.start) == (0, 4, 4)
        with pytest.raises(ValueError, match="overflows"):
            writer.accept({"a": data[:1]})
        with pytest.raises(ValueError, match="store them in order"):
            writer.store(second)
        with pytest.raises(ValueError, match="dump incomplete"):
            writer.finish({})
        writer.store(first)
        writer.store(second)
        writer.finish({"nodes_per_instance": 5, "num_instances": 2})
    with DumpWriter(tmp_path / "w", {"a": 3}, 10) as writer:
        writer.write({"a": data})
        writer.finish({"nodes_per_instance": 5, "num_instances": 2})
    ahead, whole = open_dump(tmp_path / "d", verify="always"), open_dump(tmp_path / "w", verify=True)
    np.testing.assert_array_equal(ahead.arrays["a"], data)
    assert ahead.metadata["sha256"]["a.npy"] == whole.metadata["sha256"]["a.npy"]
    np.testing.assert_allclose(ahead.covariance("a"), whole.covariance("a"), rtol=1e-6)


def test_covariance_of_an_older_dump_is_a_clear_error(tmp_path):
    _write(tmp_path / "d")
    (tmp_path / "d" / "a_covariance.npy").unlink()  # as dumps collected before covariances were stored
    meta = json.loads((tmp_path / "d" / "metadata.json").read_text())
    del meta["arrays"]["a"]["covariance_file"], meta["sha256"]["a_covariance.npy"]
    (tmp_path / "d" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="no covariance of a .*collect it again with --overwrite"):
        open_dump(tmp_path / "d").covariance("a")


def test_float16_storage(tmp_path):
    data = _write(tmp_path / "h", dtype="float16")
    dump = open_dump(tmp_path / "h", verify="always")  # the sha256 hashed while writing is the file's own
    assert dump.arrays["a"].dtype == np.float16
    np.testing.assert_allclose(dump.arrays["a"], data["a"], rtol=1e-3, atol=1e-2)


def test_running_stats_merge_matches_numpy():
    x = np.random.default_rng(1).normal(1e3, 1e-2, size=(1000, 2))
    stats = RunningStats(2)
    for chunk in np.array_split(x, 13):
        stats.update(chunk)
    np.testing.assert_allclose(stats.mean, x.mean(0))
    np.testing.assert_allclose(stats.std, x.std(0), rtol=1e-6)


def test_an_interrupted_dump_never_looks_complete(tmp_path):
    path = tmp_path / "d"
    with pytest.raises(KeyboardInterrupt), DumpWriter(path, {"a": 2}, 10) as writer:
        writer.write({"a": np.zeros((4, 2), np.float32)})
        raise KeyboardInterrupt
    assert not path.exists() and not (tmp_path / "d.partial").exists()
    writer = DumpWriter(path, {"a": 2}, 10)
    writer.write({"a": np.zeros((4, 2), np.float32)})  # a crash here leaves only d.partial
    with pytest.raises(ValueError, match="incomplete"):
        open_dump(path)
    with pytest.raises(ValueError, match="4 of 10 rows"):
        writer.finish({})


def test_truncated_file_is_refused_with_sizes(tmp_path):
    _write(tmp_path / "d")
    file = tmp_path / "d" / "a.npy"
    file.write_bytes(file.read_bytes()[:-16])
    with pytest.raises(ValueError, match=r"a.npy is truncated or padded: \d+ bytes, expected \d+"):
        open_dump(tmp_path / "d")


def test_corrupted_bytes_are_caught_by_checksums(tmp_path):
    _write(tmp_path / "d")
    file = tmp_path / "d" / "b.npy"
    raw = bytearray(file.read_bytes())
    raw[-5] ^= 0xFF
    file.write_bytes(bytes(raw))
    open_dump(tmp_path / "d", verify="never")  # sizes still fit
    with pytest.raises(ValueError, match="b.npy: sha256 differs"):
        open_dump(tmp_path / "d")  # the file changed since the collector verified it: hashed again


def test_missing_metadata_and_wrong_shapes(tmp_path):
    _write(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "metadata.json").read_text())
    (tmp_path / "d" / "metadata.json").write_text(json.dumps({**meta, "dtype": "float16"}))
    with pytest.raises(ValueError, match=r"holds float32 \[50, 4\], metadata.json says float16 \[50, 4\]"):
        open_dump(tmp_path / "d")
    meta["arrays"]["a"]["shape"] = [51, 4]
    (tmp_path / "d" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"metadata.json: arrays.a has 51 rows, the dump 50"):
        open_dump(tmp_path / "d")
    (tmp_path / "d" / "metadata.json").unlink()
    with pytest.raises(ValueError, match="no metadata.json"):
        open_dump(tmp_path / "d")
    with pytest.raises(FileNotFoundError):
        open_dump(tmp_path / "nothing")


def test_existing_dump_needs_overwrite(tmp_path):
    _write(tmp_path / "d")
    with pytest.raises(FileExistsError, match="--overwrite"):
        DumpWriter(tmp_path / "d", {"a": 1}, 1)
    with DumpWriter(tmp_path / "d", {"c": 1}, 2, overwrite=True) as writer:
        writer.write({"c": np.ones((2, 1), np.float32)})
        writer.finish({})
    assert set(open_dump(tmp_path / "d").arrays) == {"c"}
