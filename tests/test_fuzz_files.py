"""Every file kind the toolkit reads, mutated, through every command that reads it.

Each mutation (truncated, emptied, flipped bytes, wrong types, huge or negative numbers, NaN, null, a list for
an object, deep nesting) of each file (a policy's config.json and checkpoint, a dictionary's cfg.json and weights,
a dump's metadata.json and arrays, the activation registry, a train state, an instances file) goes through the
commands that read that file, in-process. Every case must end in a one-line error or exit 0, never a traceback;
and where the mutation leaves the file unusable (truncated, emptied, NaN weights or rows, flipped bytes of a
checksummed array), in an error. The counts are printed (`pytest -s`).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from clt import describe, inspect_pairs, label, train_transcoder
from clt import eval as clt_eval
from clt.graph import attribute, intervene
from policy import solve
from sae import train_topk

PAIR = "clt_L0.mlp_in_to_L0.mlp_out"
SMALL = ["--num_epochs", "1", "--batch_size", "64", "--wandb_mode", "disabled"]


def _nested(depth: int):
    return json.loads("[" * depth + "]" * depth) if depth < 900 else "[" * depth + "]" * depth


def _map_values(obj, fn):
    """obj with every leaf value v replaced by fn(v) (objects and lists walked)."""
    if isinstance(obj, dict):
        return {k: _map_values(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_values(v, fn) for v in obj]
    return fn(obj)


def _json_mutations(text: str) -> dict[str, str]:
    obj = json.loads(text)
    number = (int, float)

    def leaves(fn):
        return json.dumps(_map_values(obj, lambda v: fn(v) if isinstance(v, number) and not isinstance(v, bool) else v))

    return {
        "truncated": text[: len(text) // 2],
        "empty": "",
        "flipped": text.replace('"', "'", 3).replace(":", ";", 2),
        "strings": json.dumps(_map_values(obj, lambda v: str(v) if v is not None else v)),
        "huge": leaves(lambda v: 10**15 if isinstance(v, int) else 1e300),
        "negative": leaves(lambda v: -3),
        "nan": leaves(lambda v: float("nan")),
        "null": json.dumps(_map_values(obj, lambda v: None)),
        "list": json.dumps(list(obj.values()) if isinstance(obj, dict) else {"x": obj}),
        "nested": "[" * 100_000 + "]" * 100_000,
    }


def _binary_mutations(data: bytes, payload_at: int) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    flipped_head = bytearray(data)
    for i in rng.integers(0, min(payload_at, len(data)), 8):
        flipped_head[i] ^= 0xFF
    flipped_data = bytearray(data)
    for i in rng.integers(payload_at, len(data), 8):
        flipped_data[i] ^= 0xFF
    return {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "flipped header": bytes(flipped_head),
        "flipped data": bytes(flipped_data),
        "huge header": (2**62).to_bytes(8, "little") + data[8:],
    }


def _npy_nan(path: Path) -> bytes:
    array = np.load(path)
    array = array.copy()
    array.flat[array.size // 2] = np.nan
    from io import BytesIO

    buffer = BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _safetensors_nan(path: Path) -> bytes:
    from safetensors.torch import load_file, save

    state = load_file(str(path))
    name = sorted(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    return save(state)


def _payload_offset(path: Path) -> int:
    if path.suffix == ".safetensors":
        return 8 + int.from_bytes(path.read_bytes()[:8], "little")
    if path.suffix == ".npy":
        with open(path, "rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            return f.tell()
    return min(64, path.stat().st_size // 2)


def _torch_bytes(obj) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _mutations(path: Path) -> dict[str, bytes]:
    data = path.read_bytes()
    if path.suffix == ".json":
        return {name: text.encode() for name, text in _json_mutations(data.decode()).items()}
    cases = _binary_mutations(data, _payload_offset(path))
    if path.suffix == ".pt":  # readable torch files that are not what the command needs
        cases["no keys"] = _torch_bytes({})
        cases["wrong types"] = _torch_bytes({"model": 1, "optimizer": "x", "position": {"epoch": -1}})
    if path.suffix == ".npy":
        cases["nan"] = _npy_nan(path)
    if path.suffix == ".safetensors":
        cases["nan"] = _safetensors_nan(path)
    return cases


UNUSABLE = {"truncated", "empty", "nan", "nested", "list", "flipped header", "huge header", "no keys", "wrong types"}
"""Mutations after which no command may succeed (for any file kind it reads); a dump's arrays are checksummed, so
flipped bytes in their data are one more."""
CHECKSUMMED = {"dump sources"}
INFORMATIONAL = {("registry", "nan")}
"""The registry's numbers (row counts) only describe its dumps; the dumps' own metadata is what readers use."""


def _newest(folder: Path) -> Path:
    return sorted(p for p in folder.iterdir() if p.is_dir())[-1]


@pytest.fixture(scope="module")
def workspace(analysed_run, tmp_path_factory) -> dict:
    """A copy of the analysed run, and the files and commands of each kind (the train states first: the commands
    of other kinds train new runs, which `--resume` would continue instead)."""
    run = tmp_path_factory.mktemp("fuzz") / "tiny"
    shutil.copytree(analysed_run, run)
    kool = run.parent / "kool"
    shutil.copytree(Path(__file__).parent / "fixtures" / "kool_am_tsp20", kool)
    locs = run.parent / "locs.npy"
    np.save(locs, np.random.default_rng(0).random((2, 10, 2), dtype=np.float32))
    tours = run.parent / "tours.npy"
    clt_dir = _newest(run / "clt" / "clt_runs" / PAIR)
    multi = _newest(run / "clt" / "clt_runs" / "clt_multilayer")
    sae_dir = _newest(run / "sae" / "sae_runs" / "encoder_layer_0")
    dump = run / "clt" / "activations" / PAIR
    r = ["--run_dir", str(run)]
    label_args = [*r, "--dictionary", str(sae_dir), "--num_instances", "20", "--permutations", "5"]
    attribute_args = [
        *r,
        "--seed",
        "3",
        "--step",
        "4",
        "--check_edges",
        "0",
        "--no_circuit",
        "--verify",
        "2",
        "--no_full_graph",
        "--out",
        str(run.parent / "graph.json"),
    ]
    policy_commands = {
        "policy.solve": (solve.main, [*r, "--instances", str(locs), "--out", str(tours)]),
        "clt.graph.attribute": (attribute.main, attribute_args),
    }
    dictionary_commands = {
        "clt.eval": (clt_eval.main, ["--clt_dir", str(clt_dir), "--num_instances", "4", "--no_labels"]),
        "clt.describe model": (describe.main, ["model", str(clt_dir)]),
    }
    multi_commands = {
        "clt.describe model": (describe.main, ["model", str(multi)]),
        "clt.graph.attribute": (attribute.main, [*attribute_args, "--clt", str(multi)]),
        "clt.graph.intervene": (
            intervene.main,
            [*r, "--seed", "3", "--step", "4", "--clt", str(multi), "--changes", "0:1:0=zero"],
        ),
    }
    dump_commands = {
        "clt.train_transcoder": (train_transcoder.main, [*r, "--pair", PAIR, *SMALL]),
        "clt.describe dump": (describe.main, ["dump", *r, "--pair", PAIR]),
        "clt.inspect_pairs": (inspect_pairs.main, [*r, "--pair", PAIR]),
        "clt.eval": (clt_eval.main, ["--clt_dir", str(clt_dir), "--num_instances", "0", "--no_labels"]),
    }
    kinds = {
        "train state": (
            clt_dir / "checkpoints" / "train_state.pt",
            {
                "clt.train_transcoder --resume": (
                    train_transcoder.main,
                    [*r, "--pair", PAIR, "--resume", "--num_epochs", "3"],
                )
            },
        ),
        "SAE train state": (
            sae_dir / "checkpoints" / "train_state.pt",
            {
                "sae.train_topk --resume": (
                    train_topk.main,
                    [*r, "--hook", "encoder_layer_0", "--resume", "--num_epochs", "3"],
                )
            },
        ),
        "policy config": (run / "config.json", policy_commands),
        "policy weights": (run / "checkpoints" / "epoch_1.safetensors", policy_commands),
        "dictionary cfg": (clt_dir / "cfg.json", dictionary_commands),
        "dictionary weights": (clt_dir / "model.safetensors", dictionary_commands),
        "multi-layer cfg": (multi / "cfg.json", multi_commands),
        "multi-layer weights": (multi / "model.safetensors", multi_commands),
        "SAE weights": (sae_dir / "model.safetensors", {"clt.label": (label.main, label_args)}),
        "SAE cfg": (sae_dir / "cfg.json", {"clt.label": (label.main, label_args)}),
        "dump metadata": (dump / "metadata.json", dump_commands),
        "dump sources": (dump / "sources.npy", dump_commands),
        "registry": (
            run / "sae" / "activation_store.json",
            {
                "clt.train_transcoder": dump_commands["clt.train_transcoder"],
                "sae.train_topk": (train_topk.main, [*r, "--hook", "encoder_layer_0", *SMALL]),
            },
        ),
        "Kool args.json": (
            kool / "args.json",
            {"policy.solve": (solve.main, ["--run_dir", str(kool), "--instances", str(locs), "--out", str(tours)])},
        ),
        "Kool checkpoint": (
            next(kool.glob("epoch-*.pt")),
            {"policy.solve": (solve.main, ["--run_dir", str(kool), "--instances", str(locs), "--out", str(tours)])},
        ),
        "instances": (locs, {"policy.solve": policy_commands["policy.solve"]}),
    }
    return {"run": run, "kinds": kinds}


def _outcome(result) -> str:
    if result.exception is None or (isinstance(result.exception, SystemExit) and result.exit_code == 0):
        return "ok"
    if not isinstance(result.exception, SystemExit):
        return "traceback"
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    return "error" if len(errors) == 1 and "Traceback" not in result.output else "traceback"


def test_every_mutation_of_every_file_ends_in_one_line_or_a_result(workspace, capsys):
    counts: Counter = Counter()
    failures = []
    for kind, (path, commands) in workspace["kinds"].items():
        original = path.read_bytes()
        try:
            for mutation, data in _mutations(path).items():
                if data == original:
                    continue  # e.g. NaN in a JSON file without numbers
                unusable = (mutation in UNUSABLE or (kind in CHECKSUMMED and mutation == "flipped data")) and (
                    kind,
                    mutation,
                ) not in INFORMATIONAL
                for name, (cli, args) in commands.items():
                    path.write_bytes(data)
                    result = CliRunner().invoke(cli, args)
                    outcome = _outcome(result)
                    counts[outcome] += 1
                    if outcome == "traceback" or (outcome == "ok" and unusable):
                        failures.append(f"{kind} {mutation} -> {name}: {outcome}: {result.output[-300:]!r} "
                                        f"{result.exception!r}")  # fmt: skip
        finally:
            path.write_bytes(original)
    with capsys.disabled():
        print(f"\nfuzz: {sum(counts.values())} cases: {dict(counts)}")
    assert not failures, f"{len(failures)} cases:\n" + "\n".join(failures)
