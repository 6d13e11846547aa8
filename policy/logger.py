"""Metrics logging: W&B when it can be had, always mirrored to a local metrics.jsonl.

`wandb_mode`:
- `auto` (default): $WANDB_MODE when it is set (online, offline, disabled, ...);
  otherwise online when W&B credentials exist (WANDB_API_KEY or a netrc entry
  for the W&B host), else offline (sync later with `wandb sync`).
- `online`, `offline`: passed to wandb.init as they are.
- `disabled`: W&B is not even imported.

A run never fails because W&B is missing or unreachable: any error while setting
it up or logging is reported once as a warning and the run goes on locally.
W&B writes under $WANDB_DIR when it is set, else under the run folder; which W&B
run a training run is (mode, project, id, url) goes into `<out_dir>/wandb.json` (`describe`), and a
transcoder's summary.json repeats it.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path

import numpy as np

from policy.io import atomic_write, write_json

log = logging.getLogger(__name__)

WANDB_MODES = ("auto", "online", "offline", "disabled")


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r}")
    if mode == "auto":
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        if env in ("online", "offline", "disabled", "dryrun"):
            return "offline" if env == "dryrun" else env
        return "online" if _has_wandb_credentials() else "offline"
    return mode


class RunLogger:
    """Logs dicts of scalars to `<out_dir>/metrics.jsonl` and, when possible, to W&B."""

    def __init__(
        self,
        out_dir: str | Path,
        project: str,
        run_name: str,
        config: dict,
        mode: str = "auto",
        run_id: str | None = None,
    ):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.mode = resolve_wandb_mode(mode)
        if mode == "auto" and os.environ.get("WANDB_MODE"):
            log.info("W&B: %s (from $WANDB_MODE)", self.mode)
        elif mode == "auto" and self.mode == "offline":
            log.info("W&B: no credentials found, logging offline (upload later with `wandb sync`)")
        self.wandb_run = None
        if self.mode != "disabled":
            self.wandb_run = self._start_wandb(out_dir, project, run_name, config, run_id)
        self.info = self.describe()  # kept: finish() lets go of the W&B run
        write_json(Path(out_dir) / "wandb.json", self.info)

    def _start_wandb(self, out_dir, project, run_name, config, run_id):
        try:
            import wandb

            return wandb.init(
                project=project,
                name=run_name,
                config=config,
                mode=self.mode,
                dir=os.environ.get("WANDB_DIR") or str(out_dir),
                id=run_id,
                resume="allow" if run_id else None,
            )
        except Exception as err:  # W&B must never take a run down
            log.warning("W&B unavailable (%s: %s); logging to %s only", type(err).__name__, err, self.path)
            return None

    @property
    def run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def describe(self) -> dict:
        """Which W&B run this is: mode, project, id, url (None offline) and the folder W&B writes to ($WANDB_DIR
        when set, else the run folder)."""
        if self.wandb_run is None:
            return {"mode": self.mode if self.mode == "disabled" else "unavailable"}
        run = self.wandb_run
        return {"mode": self.mode, "project": getattr(run, "project", None), "id": run.id,
                "url": getattr(run, "url", None), "dir": getattr(run, "dir", None)}  # fmt: skip

    def log(self, metrics: dict, step: int) -> None:
        record = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(metrics, step=step)
            except Exception as err:
                log.warning("W&B logging failed (%s); continuing with %s only", err, self.path)
                self.wandb_run = None

    def log_histograms(self, values: dict[str, np.ndarray], step: int, bins: int = 50) -> None:
        """Histograms (counts and bin edges) to metrics.jsonl, and to W&B as wandb.Histogram."""
        record = {}
        for name, array in values.items():
            counts, edges = np.histogram(np.asarray(array, dtype=np.float64), bins=bins)
            record[name] = {"counts": counts.tolist(), "edges": edges.tolist()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        if self.wandb_run is not None:
            try:
                import wandb

                self.wandb_run.log(
                    {name: wandb.Histogram(np_histogram=(r["counts"], r["edges"])) for name, r in record.items()},
                    step=step,
                )
            except Exception as err:
                log.warning("W&B histogram logging failed (%s); continuing with %s only", err, self.path)
                self.wandb_run = None

    def log_artifact(self, path: str | Path, name: str, alias: str, step: int) -> None:
        """A file (a weights checkpoint) as a version of the W&B model artifact `name`, tagged `alias`; offline runs
        keep it for `wandb sync`. metrics.jsonl records which file was logged at which step."""
        path = Path(path)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "artifact": {"name": name, "alias": alias, "file": path.name}}) + "\n")
        if self.wandb_run is not None:
            try:
                import wandb

                artifact = wandb.Artifact(name, type="model", metadata={"step": step})
                artifact.add_file(str(path), name=path.name)
                self.wandb_run.log_artifact(artifact, aliases=[alias])
            except Exception as err:
                log.warning("W&B artifact logging failed (%s); continuing with %s only", err, self.path)
                self.wandb_run = None

    def finish(self) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as err:
                log.warning("W&B finish failed: %s", err)
            self.wandb_run = None


def truncate_metrics(path: str | Path, keep_through_step: int) -> None:
    """Drop records past `keep_through_step` (a resumed run logs those steps again)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= keep_through_step
    ]
    atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))
