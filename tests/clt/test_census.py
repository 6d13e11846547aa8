"""python -m clt.census: the census table and its figures from the labels clt.label wrote."""

import shutil

from click.testing import CliRunner

from clt import census, label


def test_census_reads_the_labels_and_draws_the_bars_and_examples(analysed_run, tmp_path):
    run_dir = tmp_path / "tiny"
    shutil.copytree(analysed_run, run_dir)
    for made in run_dir.rglob("eval/labels.json"):  # clt.eval's, in the fixture
        made.unlink()
    missing = CliRunner().invoke(census.main, ["--run_dirs", str(run_dir)])
    assert missing.exit_code == 1 and "no labelled dictionary" in missing.output
    args = ["--run_dir", str(run_dir), "--all", "--num_instances", "40", "--permutations", "10", "--min_auroc", "0.51"]
    assert CliRunner().invoke(label.main, args).exit_code == 0
    figure = tmp_path / "census.png"
    result = CliRunner().invoke(census.main, ["--run_dirs", str(run_dir), "--figure", str(figure), "--examples", "1",
                                              "--num_instances", "20"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 5  # the SAE, two mlp transcoders, the two layers of the multi-layer CLT
    assert figure.stat().st_size > 0 and (tmp_path / "census_tiny_examples.png").stat().st_size > 0
    bad = CliRunner().invoke(census.main, ["--run_dirs", str(run_dir), "--figure", "x.svg"])
    assert bad.exit_code == 1 and "names a .png file" in bad.output
