"""`efftheory compare --distribution`: the output distribution's distances per width land in report.json
(config.distribution) and distribution.json, with the histograms."""

import json

from efftheory import cli


def test_compare_distribution(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["compare", "--activation", "tanh", "--critical", "--depth", "3", "--widths", "8,16,32,64",
                   "--networks", "20", "--distribution", "--distribution-networks", "400", "--no-progress",
                   "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "KS distance, one input" in text and "binned TV distance, two inputs" in text
    report = json.loads((out / "report.json").read_text())
    dist = report["config"]["distribution"]
    assert json.loads((out / "distribution.json").read_text()) == dist
    assert "--distribution" in report["config"]["command"]
    for n in (8, 16, 32, 64):
        assert (out / f"distribution_n{n}_log.png").stat().st_size > 1000
    assert (out / "distribution_distances.png").exists()
