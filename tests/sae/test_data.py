import numpy as np
import pytest

from sae.data import RowStream, split_instances


def test_split_is_by_instance_and_seeded():
    train, val = split_instances(100, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    again, _ = split_instances(100, 0.1, seed=3)
    assert np.array_equal(train, again)
    with pytest.raises(ValueError, match="val_ratio"):
        split_instances(10, 1.0, seed=0)


def _stream(batch_size=7, ids=None, seed=0):
    rows = np.arange(30 * 4, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    other = -rows
    return RowStream(
        {"x": rows, "y": other}, 4, np.arange(30) if ids is None else ids, batch_size, seed, window_batches=2
    )


def test_every_row_once_per_epoch_in_a_seeded_shuffle():
    stream = _stream()
    batches = list(stream.epoch(0))
    assert len(batches) == stream.steps_per_epoch
    seen = np.concatenate([b["x"][:, 0].numpy() for b in batches])
    assert sorted(seen.tolist()) == list(range(120))
    assert not np.array_equal(seen, np.arange(120)), "shuffled"
    again = np.concatenate([b["x"][:, 0].numpy() for b in _stream().epoch(0)])
    assert np.array_equal(seen, again)
    other_epoch = np.concatenate([b["x"][:, 0].numpy() for b in stream.epoch(1)])
    assert not np.array_equal(seen, other_epoch)


def test_arrays_stay_row_aligned():
    for batch in _stream().epoch(0):
        assert np.array_equal(batch["x"].numpy(), -batch["y"].numpy())


def test_only_the_given_instances_are_read():
    stream = _stream(ids=np.array([2, 5]))
    rows = np.concatenate([b["x"][:, 0].numpy() for b in stream.epoch(0)])
    assert sorted(rows.tolist()) == [8, 9, 10, 11, 20, 21, 22, 23]


def test_starting_at_a_step_gives_the_remaining_batches():
    stream = _stream()
    full = list(stream.epoch(2))
    tail = list(stream.epoch(2, start_step=5))
    assert len(tail) == len(full) - 5
    for a, b in zip(full[5:], tail, strict=True):
        assert np.array_equal(a["x"].numpy(), b["x"].numpy())


def test_memory_mapped_files_stream_the_same_batches(tmp_path):
    rows = np.random.default_rng(0).normal(size=(120, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", rows)
    on_disk = np.load(tmp_path / "x.npy", mmap_mode="r")
    a = RowStream({"x": rows}, 4, np.arange(30), 9, seed=1, window_batches=1, block_instances=3)
    b = RowStream({"x": on_disk}, 4, np.arange(30), 9, seed=1, window_batches=1, block_instances=3)
    assert b.readers["x"].fd is not None
    for x, y in zip(a.epoch(0), b.epoch(0), strict=True):
        assert np.array_equal(x["x"].numpy(), y["x"].numpy())
    for start in (0, 3, 7, 13, 14):
        tail = list(b.epoch(0, start_step=start))
        assert len(tail) == max(a.steps_per_epoch - start, 0)
