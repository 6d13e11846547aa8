"""Multi-layer CLTs on the reference models with the toolkit's defaults; prints one JSON object.

    python -m bench.reference_models [--models tsp20_demo,kool_tsp20,kool_tsp50,kool_tsp50_n100] [--work DIR]
                                     [--eval_instances 1000]

Each model is copied (or imported: Kool et al.'s TSP50 from `--kool_tsp50`) into a fresh runs folder under
`--work` and goes through the stages a user runs, each timed as a command: `policy.import_run` (the TSP50 model
only), `clt.collect_pairs` (the run's default pairs, its default instance count), `clt.train_transcoder
--multilayer` (defaults) and `clt.eval` (splicing on `--eval_instances` fresh instances, no labels).
`kool_tsp50_n100` is the TSP50 model on 100-city instances (collected with `--num_loc 100`, trained with
`--condition`, spliced on 100-city instances): no pretrained TSP100 model is at hand. Reported per model and
layer: FVU, dead, dense and effective features, L0, the splice gap of the layer alone, and the whole replacement's
gap, agreement and KL; and the wall time of each stage.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
MODELS = {"tsp20_demo": REPO / "runs" / "tsp20_demo", "kool_tsp20": REPO / "runs" / "kool_tsp20", "kool_tsp50": None,
          "kool_tsp50_n100": None}  # fmt: skip
"""Where each model comes from: a run folder to copy, or None for Kool's TSP50 model, imported."""
NUM_LOC = {"kool_tsp50_n100": 100}
"""Models measured on instances of another size than they were trained on."""


def stage(args: list[str]) -> float:
    """Run `python -m ARGS` in the repository; its wall time in seconds (a failure stops the bench)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise click.ClickException(f"{' '.join(args[:1])} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return round(time.perf_counter() - start, 1)


def bench_model(name: str, runs: Path, kool_tsp50: Path, eval_instances: int) -> dict:
    times = {}
    if MODELS[name] is None:
        times["import"] = stage(["policy.import_run", "--from", str(kool_tsp50), "--run_name", name,
                                 "--runs_dir", str(runs)])  # fmt: skip
    else:
        shutil.copytree(MODELS[name], runs / name)
    run_dir = str(runs / name)
    size = ["--num_loc", str(NUM_LOC[name])] if name in NUM_LOC else []
    times["collect"] = stage(["clt.collect_pairs", "--run_dir", run_dir, *size])
    condition = []
    if size:  # the dumps' condition: the part of their names after "__"
        dumps = (runs / name / "clt" / "activations").glob(f"*__uniform_n{NUM_LOC[name]}_*")
        dump = next(path for path in sorted(dumps) if path.is_dir())
        condition = ["--condition", dump.name.split("__", 1)[1]]
    times["train"] = stage(["clt.train_transcoder", "--run_dir", run_dir, "--multilayer", "--wandb_mode", "disabled",
                            *condition])  # fmt: skip
    times["eval"] = stage(["clt.eval", "--run_dir", run_dir, "--pair", "clt_multilayer", "--no_labels",
                           "--num_instances", str(eval_instances)])  # fmt: skip
    folder = sorted((runs / name / "clt" / "clt_runs" / "clt_multilayer").iterdir())[-1]
    report = json.loads((folder / "eval" / "metrics.json").read_text())
    splice = report["splice"]
    layers = {
        layer: {
            "fvu": round(r["fvu"], 5),
            "dead": round(r["dead_fraction"], 4),
            "dense": round(r["dense_fraction"], 4),
            "effective_features": round(r["effective_features"], 1),
            "l0": round(r["l0"], 2),
            "splice_gap_alone": round(splice[f"transcoder {layer} only"]["gap"], 5),
        }
        for layer, r in report["reconstruction"].items()
    }
    whole = splice["transcoder"]
    return {"features_per_layer": report["features"] // report["layers"], "k": report["k"], "layers": layers,
            "whole": {"splice_gap": round(whole["gap"], 5), "agreement": round(whole["action_agreement"], 4),
                      "kl": round(whole["mean_kl"], 4)},
            "seconds": times}  # fmt: skip


@click.command()
@click.option("--models", default=",".join(MODELS), help=f"Comma-separated, from: {', '.join(MODELS)}.")
@click.option("--kool_tsp50", default=str(REPO.parent / "shared" / "fixtures" / "kool_am_tsp50"),
              help="Kool et al.'s pretrained TSP50 run folder (args.json + epoch-<N>.pt).")  # fmt: skip
@click.option("--work", default=None, help="Where the runs are made [default: a temporary folder, removed].")
@click.option("--eval_instances", default=1000, help="Fresh instances each splice is measured on.")
def main(models, kool_tsp50, work, eval_instances):
    """Defaults on the reference models: quality per layer and time per stage."""
    names = [m for m in models.split(",") if m]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise click.BadParameter(f"unknown models {unknown}; choose from {sorted(MODELS)}", param_hint="--models")
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(work) if work else Path(tmp)
        runs.mkdir(parents=True, exist_ok=True)
        result = {name: bench_model(name, runs, Path(kool_tsp50), eval_instances) for name in names}
    click.echo(json.dumps({"bench": "reference_models", "eval_instances": eval_instances, "models": result}))


if __name__ == "__main__":
    main()
