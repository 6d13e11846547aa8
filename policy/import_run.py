"""Turn an RL4CO or Kool et al. checkpoint into a native run, so that its outputs live in `runs/<name>/`.

    python -m policy.import_run --from ~/attention-learn-to-route/pretrained/tsp_20 --run_name kool_tsp20
    python -m policy.import_run --from lightning_logs/version_0 --run_name my_rl4co_run --checkpoint 99
    python -m policy.import_run --from epoch=99.ckpt --run_name my_rl4co_run --num_loc 50

`--from` is a run folder (RL4CO: config.json + checkpoints/checkpoint_epoch_<N>.ckpt; Kool: args.json +
epoch-<N>.pt) or one checkpoint file (an RL4CO `.ckpt` or policy state dict; give `--num_loc`). Writes

    runs/<name>/config.json                      {"policy", "env", "imported": provenance}
    runs/<name>/checkpoints/epoch_<N>.safetensors

and checks that the new run decodes the same tours as the original on a probe batch. Nothing of the original
folder is written.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from policy import __version__
from policy.checks import check_types
from policy.cli import command
from policy.env import DISTRIBUTIONS, generate
from policy.io import file_sha256, write_json
from policy.loading import load_policy
from policy.model import AttentionModel
from policy.options import choice, options
from policy.rl4co import load_checkpoint
from policy.runs import check_name
from policy.torch_files import save_tensors


@dataclass
class ImportConfig:
    source: str
    """A Kool or RL4CO run folder, or one RL4CO checkpoint / policy state dict file."""
    run_name: str
    """Name of the new run folder under runs_dir."""
    runs_dir: str = "runs"
    """Where the new run is created."""
    checkpoint: int | None = None
    """Epoch to import from a run folder [default: the latest]."""
    num_heads: int | None = None
    """Attention heads, where the source does not record them (Kool's args.json, state dicts) [default: 8]."""
    num_loc: int | None = None
    """Training size, for a single checkpoint file (a run folder records it)."""
    distribution: str = choice("uniform", DISTRIBUTIONS)
    """Training distribution, for a single checkpoint file."""

    def __post_init__(self):
        check_types(self)
        check_name(self.run_name)
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}")
        if self.num_loc is not None and self.num_loc < 3:
            raise ValueError("num_loc must be at least 3")


def run(cfg: ImportConfig) -> Path:
    """Import; returns the new run folder."""
    source = Path(cfg.source).expanduser()
    if source.is_dir():
        loaded = load_policy(source, cfg.checkpoint, num_heads=cfg.num_heads)
        model, num_loc, distribution = loaded.model, loaded.config.num_loc, loaded.config.distribution
        epoch, checkpoint = loaded.epoch, loaded.checkpoint
    elif source.is_file():
        if cfg.num_loc is None:
            raise ValueError("a single checkpoint file does not record its training size: pass --num_loc")
        model, num_loc, distribution = load_checkpoint(source, cfg.num_heads), cfg.num_loc, cfg.distribution
        epoch, checkpoint = 0, source
    else:
        raise FileNotFoundError(f"no such run folder or checkpoint: {source}")
    out = Path(cfg.runs_dir) / cfg.run_name
    try:
        (out / "checkpoints").mkdir(parents=True)
    except FileExistsError:
        raise FileExistsError(f"{out} already exists; pick another --run_name") from None
    try:
        provenance = {"from": str(source.resolve()), "checkpoint": str(checkpoint.resolve()),
                      "checkpoint_sha256": file_sha256(checkpoint), "epoch": epoch,
                      "package_version": __version__}  # fmt: skip
        save_tensors(out / "checkpoints" / f"epoch_{epoch}.safetensors", model.state_dict())
        write_json(out / "config.json", {"policy": model.cfg.to_dict(),
                                         "env": {"num_loc": num_loc, "distribution": distribution},
                                         "imported": provenance})  # fmt: skip
        _check_same_tours(model, out, num_loc)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


@torch.no_grad()
def _check_same_tours(original: AttentionModel, out: Path, num_loc: int) -> None:
    locs = generate(32, num_loc, seed=0)
    imported = load_policy(out).model
    if not torch.equal(original(locs).actions, imported(locs).actions):
        raise ValueError(f"{out}: the imported weights decode other tours than the original (please report this)")


@click.command()
@options(ImportConfig, source={"flag": "--from"})
def main(**settings):
    """Import an RL4CO or Kool et al. checkpoint as a native run (config.json + safetensors + provenance)."""
    with command():
        out = run(ImportConfig(**settings))
    click.echo(f"imported into {out}")


if __name__ == "__main__":
    main()
