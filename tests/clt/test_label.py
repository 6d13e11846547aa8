"""python -m clt.label end to end: every dictionary of a run labelled, labels.json written, bad input refused."""

import json
import shutil

import pytest
from click.testing import CliRunner

from clt import label
from clt.feature_labels import CATEGORIES


@pytest.fixture
def run_copy(analysed_run, tmp_path):
    run_dir = tmp_path / "tiny"
    shutil.copytree(analysed_run, run_dir)
    return run_dir


def test_label_all_writes_a_document_per_folder_with_a_label_per_feature(run_copy):
    args = ["--run_dir", str(run_copy), "--all", "--num_instances", "40", "--permutations", "10"]
    result = CliRunner().invoke(label.main, args)
    assert result.exit_code == 0, result.output
    assert "clt/clt_multilayer/L1" in result.output and "sae/encoder_layer_0" in result.output
    paths = sorted(run_copy.rglob("eval/labels.json"))
    assert len(paths) == 4  # the SAE, two mlp transcoders, the multi-layer CLT
    for path in paths:
        doc = json.loads(path.read_text())
        assert doc["schema"] == "tsp-interp.labels/1" and doc["instances"]["num_instances"] == 40
        for section in doc["dictionaries"].values():
            assert [e["index"] for e in section["labels"]] == list(range(section["features"]))
            assert {e["category"] for e in section["labels"]} <= {*CATEGORIES, "rare", "dead"}
            assert section["census"]["features"] == section["features"]
    multilayer = json.loads(next(p for p in paths if "clt_multilayer" in str(p)).read_text())
    assert sorted(multilayer["dictionaries"]) == ["clt/clt_multilayer/L0", "clt/clt_multilayer/L1"]


def test_label_json_prints_the_documents(run_copy):
    folder = next((run_copy / "sae" / "sae_runs" / "encoder_layer_0").iterdir())
    args = ["--run_dir", str(run_copy), "--dictionary", str(folder), "--num_instances", "20", "--permutations", "5",
            "--json"]  # fmt: skip
    result = CliRunner().invoke(label.main, args)
    assert result.exit_code == 0, result.output
    (doc,) = json.loads(result.stdout).values()
    assert list(doc["dictionaries"]) == ["sae/encoder_layer_0"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--dictionary FOLDER (one or more) or --all"),
        (["--all", "--num_instances", "2"], "num_instances must be at least 4"),
        (["--all", "--min_auroc", "0.3"], "min_auroc must be in"),
        (["--dictionary", "/nowhere"], "not a finished SAE or transcoder run folder"),
    ],
)
def test_bad_options_are_one_line_errors(run_copy, extra, message):
    result = CliRunner().invoke(label.main, ["--run_dir", str(run_copy), *extra])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_attribution_graph_nodes_carry_their_labels_and_the_summary_speaks_them(run_copy, tmp_path):
    from clt.graph import attribute as attribute_cli

    result = CliRunner().invoke(label.main, ["--run_dir", str(run_copy), "--all", "--num_instances", "40",
                                             "--permutations", "10", "--min_auroc", "0.51"])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = tmp_path / "graph.json"
    args = ["--run_dir", str(run_copy), "--seed", "3", "--step", "2", "--out", str(out), "--verify", "0"]
    result = CliRunner().invoke(attribute_cli.main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    nodes = [n for n in doc["nodes"] if n["kind"] == "feature"]
    assert nodes and all("label" in n and "category" in n for n in nodes)
    assert doc["in_words"].startswith(f"city {doc['policy_tour'][2]}") and "in words: city" in result.output
    top = doc["top_features"][0]
    assert top["label"].split(",")[0].split(" (")[0] in doc["in_words"] or "rare" in top["label"]
