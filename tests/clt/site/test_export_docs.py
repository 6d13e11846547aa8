"""clt.site.export and clt.graph.weights: the site's data, and the direct-path virtual weights behind its graphs."""

import json

import pytest
import torch
from click.testing import CliRunner

from clt.graph.weights import norm_scales, path_scale, stream_position, virtual_weights
from clt.site import export as export_docs
from policy.env import generate, is_valid_tour
from sae.hooks import HookedPolicy


@pytest.fixture(scope="module")
def site(site_dir):
    js = (site_dir / "data" / "site.js").read_text()
    data = json.loads((site_dir / "data" / "site.json").read_text())
    assert (
        js.startswith("window.SITE_DATA = ")
        and json.loads(js.removeprefix("window.SITE_DATA = ").rstrip(";\n")) == data
    )
    return data


def test_site_holds_the_policy_every_dictionary_and_their_views(site):
    assert site["schema"] == "tsp-interp.site/1"
    overview = site["overview"]
    assert overview["policy"]["num_encoder_layers"] == 2 and overview["env"]["num_loc"] == 10
    names = {row["name"]: row for row in overview["dictionaries"]}
    assert set(names) == {"encoder_layer_0", "clt_L0.mlp_in_to_L0.mlp_out", "clt_L1.mlp_in_to_L1.mlp_out",
                          "clt_multilayer"}  # fmt: skip
    assert names["clt_L0.mlp_in_to_L0.mlp_out"]["splice"]["transcoder"]["action_agreement"] > 0
    sae = names["encoder_layer_0"]["summary"]
    assert 0 <= sae["val/fvu"] < 2 and sae["features"] == 32 and sae["k"] == 3
    (matrix,) = overview["generalization"]
    assert matrix["pair"] == "clt_L0.mlp_in_to_L0.mlp_out" and matrix["evaluated_on"][1] == "tiny@1 clustered n10"
    assert len(matrix["cells"]) == 1 and "config" not in matrix
    positions = {i: d["position"] for i, d in site["dictionaries"].items()}
    assert positions == {"sae/encoder_layer_0": 2, "clt/clt_L0.mlp_in_to_L0.mlp_out": 1, "clt/clt_multilayer/L0": 1,
                         "clt/clt_L1.mlp_in_to_L1.mlp_out": 3, "clt/clt_multilayer/L1": 3}  # fmt: skip
    views = {v["id"]: v["dictionaries"] for v in site["views"]}
    assert views == {"sae": ["sae/encoder_layer_0"],
                     "mlp": ["clt/clt_L0.mlp_in_to_L0.mlp_out", "clt/clt_L1.mlp_in_to_L1.mlp_out"],
                     "multilayer": ["clt/clt_multilayer/L0", "clt/clt_multilayer/L1"]}  # fmt: skip


def test_feature_pages_hold_their_top_instances_with_the_greedy_tour(site, site_dir):
    decisions = json.loads((site_dir / "data" / "decisions.json").read_text())
    for dict_id, d in site["dictionaries"].items():
        pages = d["feature_pages"]
        assert pages
        means = [p["mean"] for p in pages[:5]]  # the most active, then those the decisions' graphs name
        assert means == sorted(means, reverse=True) and all(p["frequency"] > 0 for p in pages)
        named = {int(f["id"].split(":")[3]) for e in decisions for f in e["top_features"][:12]
                 if e["replacement"]["dictionaries"][int(f["id"].split(":")[1])] == dict_id}  # fmt: skip
        assert {p["index"] for p in pages[5:]} <= named
        for page in pages:
            assert len(page["top_instances"]) == 3 and sum(page["histogram"]["counts"]) > 0
            peaks = [max(t["activations"]) for t in page["top_instances"]]
            assert peaks == sorted(peaks, reverse=True) and peaks[0] == pytest.approx(page["max"], rel=1e-3)
            for top in page["top_instances"]:
                instance = site["instances"][str(top["instance"])]
                assert len(top["activations"]) == 10 and len(instance["locs"]) == 20
                assert is_valid_tour(torch.tensor([instance["tour"]]), 10).all()


def test_graph_edges_join_shown_features_of_a_view_and_pages_list_neighbours(site):
    shown = {(i, p["index"]) for i, d in site["dictionaries"].items() for p in d["feature_pages"]}
    for view in site["views"]:
        assert len(view["edges"]) <= 40
        for up, i, down, j, attr in view["edges"]:
            assert (up, i) in shown and (down, j) in shown
            assert up in view["dictionaries"] and down in view["dictionaries"] and 0 < abs(attr) < float("inf")
    mlp = site["views"][1]
    assert mlp["id"] == "mlp" and mlp["edges"], "layer 0's mlp_out reaches layer 1's mlp_in"
    assert all(e[0].endswith("L0.mlp_out") for e in mlp["edges"])
    layer0 = site["dictionaries"]["clt/clt_L0.mlp_in_to_L0.mlp_out"]["feature_pages"]
    assert all(p["downstream"] and not p["upstream"] for p in layer0)
    layer1 = site["dictionaries"]["clt/clt_L1.mlp_in_to_L1.mlp_out"]["feature_pages"]
    assert all(not p["upstream_sae"] for p in layer0)  # the SAE reads layer 0's output: it feeds layer 1, not 0
    assert all(len(p["upstream_sae"]) == 6 and p["upstream_sae"][0][0] == "sae/encoder_layer_0" for p in layer1)
    assert not site["dictionaries"]["sae/encoder_layer_0"]["feature_pages"][0]["upstream_sae"]


def test_the_export_traces_early_middle_and_late_decisions_through_the_multilayer_clt(site, site_dir):
    js = (site_dir / "data" / "decisions.js").read_text()
    decisions = json.loads((site_dir / "data" / "decisions.json").read_text())
    assert json.loads(js.removeprefix("window.DECISIONS = ").rstrip(";\n")) == decisions
    assert [d["step"] for d in decisions] == [1, 5, 8, 1, 5, 8]  # 2 instances of 10 cities
    for d in decisions:
        assert d["replacement"]["dictionaries"] == ["clt/clt_multilayer/L0", "clt/clt_multilayer/L1"]
        assert all(n["kept"] for n in d["nodes"]) and len(d["edges"]) <= 1500
        assert d["verification"]["local"]["max_relative_error"] < 1e-8 and "removals" not in d["verification"]["live"]
    features = {(d, p["index"]) for d, v in site["dictionaries"].items() for p in v["feature_pages"]}
    top = decisions[0]["top_features"][0]["id"].split(":")
    assert (f"clt/clt_multilayer/L{top[1]}", int(top[3])) in features  # its strongest feature has a page


def test_export_without_dictionaries_is_a_clear_error(tiny_run, tmp_path):
    result = CliRunner().invoke(export_docs.main, ["--run_dir", str(tiny_run), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "no trained SAE or transcoder" in result.output
    assert not (tmp_path / "site.json").exists()


def test_stream_positions_follow_the_post_norm_layer():
    assert [stream_position(h, 2, write=False) for h in ("init_embedding", "encoder_layer_0.mlp_in", "encoder_layer_0",
            "encoder_layer_1.input", "encoder_output")] == [0, 1, 2, 2, 4]  # fmt: skip
    assert stream_position("encoder_layer_1.mlp_out", 2, write=True) == 3.5
    assert stream_position("encoder_layer_1.mlp_out", 2, write=False) is None
    assert stream_position("decoder.glimpse", 2, write=False) is None
    scales = [torch.full((3,), float(k + 2)) for k in range(4)]  # norm k scales by k + 2
    assert path_scale(scales, "encoder_layer_0.mlp_out", "encoder_layer_0.mlp_in") is None
    assert torch.equal(path_scale(scales, "encoder_layer_0", "encoder_layer_1.input"), torch.ones(3))
    assert torch.equal(path_scale(scales, "encoder_layer_0.mlp_out", "encoder_layer_1.mlp_in"), torch.full((3,), 12.0))
    assert torch.equal(path_scale(scales, "init_embedding", "encoder_output"), torch.full((3,), 120.0))


@pytest.mark.parametrize("normalization", ["batch", "instance"])
def test_path_scale_is_the_exact_residual_path_when_attention_is_silenced(normalization):
    """With layer 1's attention zeroed, mlp_in_1 = Norm1_1(Norm2_0(h_0 + mlp_out_0)): a change of mlp_out_0
    reaches mlp_in_1 multiplied by path_scale (exactly for batch norm, on average for instance norm)."""
    from policy.model import AttentionModel, PolicyConfig

    torch.manual_seed(0)
    model = AttentionModel(PolicyConfig(embed_dim=16, num_encoder_layers=2, num_heads=4, ff_hidden=32,
                                        normalization=normalization)).eval()  # fmt: skip
    for norm in (n.norm for layer in model.layers for n in (layer.norm1, layer.norm2)):
        if isinstance(norm, torch.nn.BatchNorm1d):
            norm.running_var.uniform_(0.5, 2.0)
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    hooked, locs = HookedPolicy(model), generate(64, 10, "uniform", seed=0)
    delta = torch.randn(16) * 0.1
    silence = {"encoder_layer_1.attn_out": lambda x, name: torch.zeros_like(x)}

    def mlp_in_1(extra: dict) -> torch.Tensor:
        with hooked.hooks({**silence, **extra}):
            return hooked.run_with_cache(locs, ["encoder_layer_1.mlp_in"])["encoder_layer_1.mlp_in"]

    scale = path_scale(norm_scales(model, locs), "encoder_layer_0.mlp_out", "encoder_layer_1.mlp_in")
    if normalization == "batch":
        change = mlp_in_1({"encoder_layer_0.mlp_out": lambda x, name: x + delta}) - mlp_in_1({})
        torch.testing.assert_close(change, (scale * delta).expand_as(change), rtol=1e-4, atol=1e-5)
    else:  # an approximation: instance norm re-centres each instance (a change at node 0 keeps 1 - 1/nodes of
        # itself) and its divisor moves with the change
        bump = torch.zeros(10, 16)
        bump[0] = delta * 0.01
        change = mlp_in_1({"encoder_layer_0.mlp_out": lambda x, name: x + bump}) - mlp_in_1({})
        torch.testing.assert_close(change[:, 0].mean(0), scale * bump[0] * 0.9, rtol=0.25, atol=1e-6)


def test_virtual_weights_sum_over_every_layer_a_clt_feature_writes(analysed_run):
    from clt.dictionaries import load_transcoder_dictionaries
    from sae.runs import finished_runs

    folder = finished_runs(analysed_run, "clt")["clt_multilayer"][-1]
    layer0, layer1 = load_transcoder_dictionaries(folder, "clt_multilayer")
    assert list(layer0.writes) == ["encoder_layer_0.mlp_out", "encoder_layer_1.mlp_out"]
    scales = [torch.rand(16) + 0.5 for _ in range(4)]
    v = virtual_weights(layer0, layer1, scales)
    w = layer0.writes["encoder_layer_0.mlp_out"] * scales[1] * scales[2]  # only layer 0's write reaches mlp_in_1
    torch.testing.assert_close(v, w @ layer1.encoder.T)
    assert virtual_weights(layer1, layer0, scales) is None and virtual_weights(layer0, layer0, scales) is None


def test_the_user_chooses_what_the_site_shows_and_an_unplaceable_dictionary_is_skipped(analysed_run, tmp_path,
                                                                                       caplog):  # fmt: skip
    import shutil

    from sae import collect_activations, train_topk
    from sae.runs import finished_runs

    run_dir = tmp_path / "tiny"
    shutil.copytree(analysed_run, run_dir)
    hook = "encoder_layer_0.mlp_out"  # not on the residual stream: the site cannot place it
    for cli, args in (
        (collect_activations.main, ["--hooks", hook, "--num_instances", "30", "--name", "out"]),
        (
            train_topk.main,
            [
                "--hook",
                hook,
                "--dataset",
                "out",
                "--expansion_factor",
                "2",
                "--k",
                "2",
                "--batch_size",
                "64",
                "--num_epochs",
                "1",
                "--wandb_mode",
                "disabled",
            ],
        ),
    ):
        assert CliRunner().invoke(cli, ["--run_dir", str(run_dir), *args]).exit_code == 0  # fmt: skip
    base = ["--run_dir", str(run_dir), "--num_instances", "12", "--features", "2", "--top_instances", "2"]
    result = CliRunner().invoke(export_docs.main, [*base, "--out", str(tmp_path / "all")])
    assert result.exit_code == 0, result.output
    assert f"skipping sae/{hook}" in caplog.text
    shown = json.loads((tmp_path / "all" / "site.json").read_text())["dictionaries"]
    assert f"sae/{hook}" not in shown and "sae/encoder_layer_0" in shown
    one = finished_runs(run_dir, "clt")["clt_L1.mlp_in_to_L1.mlp_out"][-1]
    result = CliRunner().invoke(export_docs.main, [*base, "--out", str(tmp_path / "one"), "--dictionaries", str(one)])
    assert result.exit_code == 0, result.output
    assert list(json.loads((tmp_path / "one" / "site.json").read_text())["dictionaries"]) == [
        "clt/clt_L1.mlp_in_to_L1.mlp_out"
    ]
    wrong = CliRunner().invoke(export_docs.main, [*base, "--out", str(tmp_path / "x"), "--dictionaries", str(tmp_path)])
    assert wrong.exit_code == 1 and "not a finished SAE or transcoder run folder" in wrong.output
