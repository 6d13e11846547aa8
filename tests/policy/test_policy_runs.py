"""policy.runs: the training lock on a run folder, and which folder --resume continues."""

import subprocess
import sys

import pytest

from policy.runs import lock_run, release_run, resume_folder

HOLD = "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('4242'); "
HOLD += "f.flush(); print('held', flush=True); time.sleep(60)"


def test_a_folder_another_process_trains_in_is_refused_in_one_line(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / ".training.lock")], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=r"is being trained by another process \(pid 4242\)"):
            lock_run(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert lock_run(tmp_path) == tmp_path  # the kernel dropped the dead holder's lock
    assert (tmp_path / ".training.lock").read_text().strip().isdigit()
    release_run(tmp_path)


def test_resume_passes_over_an_empty_folder_but_never_continues_an_older_run(tmp_path):
    older = tmp_path / "20260101-000000"
    (older / "checkpoints").mkdir(parents=True)
    (older / "checkpoints" / "train_state.pt").write_bytes(b"x")
    (tmp_path / "20260102-000000").mkdir()  # a start refused before it wrote anything
    assert resume_folder(tmp_path) == older
    (tmp_path / "20260103-000000").mkdir()
    (tmp_path / "20260103-000000" / "train_cfg.json").write_text("{}")  # killed before its first save
    with pytest.raises(FileNotFoundError, match="has no saved training state"):
        resume_folder(tmp_path)
