"""DDP under torchrun (2 CPU processes, gloo): the same weights as one process, and resume across rank counts."""

import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from clt.train_transcoder import TranscoderTrainConfig, run

PAIR = "clt_L0.mlp_in_to_L0.mlp_out"  # collected by conftest's pair_run


def _cfg(run_dir, **kw):
    base = dict(run_dir=str(run_dir), pair=PAIR, expansion_factor=4, k=4, batch_size=64, num_epochs=2,
                wandb_mode="disabled")  # fmt: skip
    return TranscoderTrainConfig(**{**base, **kw})


def _torchrun(run_dir, *extra):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "clt.train_transcoder", "--run_dir", str(run_dir), "--pair", PAIR,
               "--expansion_factor", "4", "--k", "4", "--batch_size", "64", "--wandb_mode", "disabled",
               *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = [line for line in result.stdout.splitlines() if line.startswith("transcoder saved in ")]
    assert len(saved) == 1, result.stdout  # only rank 0 reports and writes
    return saved[0].removeprefix("transcoder saved in ")


def _close(a_dir, b_dir):
    a, b = load_file(f"{a_dir}/model.safetensors"), load_file(f"{b_dir}/model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_two_ranks_train_like_one_process_with_the_same_global_batch(pair_run):
    single = run(_cfg(pair_run))
    two = _torchrun(pair_run, "--num_epochs", "2")
    _close(single, two)


def test_resume_on_a_different_number_of_ranks(pair_run):
    # a constant lr: a 1-epoch budget decays within epoch 1, which a 2-epoch run does not (the schedule follows the
    # budget), and this test is about the ranks
    single = run(_cfg(pair_run, lr_decay=0.0))
    _torchrun(pair_run, "--num_epochs", "1", "--lr_decay", "0")  # two ranks train the first epoch ...
    resumed = run(_cfg(pair_run, lr_decay=0.0), resume=True, explicit=("num_epochs",))  # ... one process the second
    _close(single, resumed)
