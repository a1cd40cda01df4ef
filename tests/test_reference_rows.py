"""Published numbers in a suite's report: the ``[reference]`` table is validated, rendered in its own
labelled block under its dataset exactly as printed, and never enters the statistics or results.csv."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_leaderboard import FIXTURE_SUITE, make_fixture, write_suite

from mmbalance.errors import ConfigError
from mmbalance.leaderboard.reference import column_formats
from mmbalance.leaderboard.report import build_report, write_report
from mmbalance.leaderboard.suite import load_suite

REFERENCE = """
    [[reference.mfeat-hard]]
    source = "Some paper (2024), Table 9"
    protocol = "test-selected, 1 seed"
    note = "Encoders not stated."
    metrics = ["Acc", "MAE"]
    rows = [["Baseline", 65.50, 0.952], ["alpha", "70.00", 0.9], ["Greedy", "-", 1.016]]
"""


def _fixture_with_reference(root: Path):
    """The leaderboard tests' fake runs, reported through the same suite plus a [reference] table."""
    _, specs = make_fixture(root)
    return load_suite(write_suite(root, "fx", FIXTURE_SUITE + REFERENCE)), specs


def test_reference_block_is_rendered_under_its_dataset_and_never_tested(tmp_path):
    suite, specs = _fixture_with_reference(tmp_path)
    rep = build_report(suite, specs)
    write_report(rep, tmp_path / "out")
    md = (tmp_path / "out" / "README.md").read_text()
    hard = md.index("## mfeat-hard")
    block = md.index("### Published numbers (reference only, not comparable)")
    assert block > hard and md.count("### Published numbers") == 1  # only under mfeat-hard
    assert "**Some paper (2024), Table 9** — protocol: test-selected, 1 seed. Encoders not stated." in md
    # TOML reads 65.50 as 65.5 (its column's most decimals: 1); text "70.00" stays as written; 0.9 shows the
    # three decimals of its column; "-" stays "-"
    assert "| Baseline        | 65.5  | 0.952 |" in md
    assert "| alpha           | 70.00 | 0.900 |" in md and "| Greedy          | -     | 1.016 |" in md
    # the suite's own rows are unchanged: the published "alpha" is not a row, not tested, not in results.csv
    ds = next(d for d in rep.datasets if d.name == "mfeat-hard")
    assert sorted(ds.rows) == sorted(r.row for r in ds.ordered_rows())
    assert "Some paper" not in (tmp_path / "out" / "results.csv").read_text()
    assert "65.5" not in (tmp_path / "out" / "results.csv").read_text()
    # without a [reference] table the report has no such block
    plain, specs2 = make_fixture(tmp_path / "plain")
    write_report(build_report(plain, specs2), tmp_path / "o2")
    assert "Published numbers" not in (tmp_path / "o2" / "README.md").read_text()


@pytest.mark.parametrize("body, message", [
    ("[[reference.mfeat]]\nprotocol = \"p\"\nmetrics = [\"Acc\"]\nrows = [[\"a\", 1.0]]\n", "'source' must be"),
    ("[[reference.mfeat]]\nsource = \"s\"\nmetrics = [\"Acc\"]\nrows = [[\"a\", 1.0]]\n", "'protocol' must be"),
    ("[[reference.mfeat]]\nsource = \"s\"\nprotocol = \"p\"\nmetrics = [\"Acc\", \"F1\"]\nrows = [[\"a\", 1.0]]\n",
     "must be [label, 2 value(s)]"),
    ("[[reference.mfeat]]\nsource = \"s\"\nprotocol = \"p\"\nmetrics = [\"Acc\"]\nrows = [[\"a\", \"n/a\"]]\n",
     "a number (or a number as text"),
    ("[[reference.cifar]]\nsource = \"s\"\nprotocol = \"p\"\nmetrics = [\"Acc\"]\nrows = [[\"a\", 1.0]]\n",
     "'cifar' is not a dataset of this suite"),
    ("[[reference.mfeat]]\nsource = \"s\"\nprotocol = \"p\"\nmetrics = [\"Acc\"]\nrows = [[\"a\", 1.0]]\nseeds = 3\n",
     "unknown key(s) seeds"),
])
def test_bad_reference_tables_are_refused_naming_the_key(tmp_path, body, message):
    path = write_suite(tmp_path, "bad", FIXTURE_SUITE + "\n" + body)
    with pytest.raises(ConfigError) as exc:
        load_suite(path)
    assert message in str(exc.value) and "reference." in str(exc.value)


def test_shipped_suites_carry_the_published_tables():
    paper = load_suite("paper").reference
    assert sorted(paper) == ["brats2021", "food101", "iemocap", "mosi"]
    rows = {t.source.split(", ")[-1]: dict(t.rows) for ts in paper.values() for t in ts}
    assert rows["Table 2"]["CGGM"] == [92.94, 92.90] and rows["Table 3"]["Baseline"] == [74.03, 67.08, 66.53, 69.21]
    mosi = next(t for t in paper["mosi"])
    assert dict(mosi.rows)["CGGM"] == [82.84, 33.73, 82.74, 0.915, 0.717] and dict(mosi.rows)["AGM"] == [None] * 5
    assert dict(paper["iemocap"][0].rows)["ReconBoost"] == [73.14, 72.71]
    assert column_formats(mosi.rows, 5) == [2, 2, 2, 3, 3]
    av = load_suite("av").reference
    bb = dict(av["cremad-legacy"][0].rows)
    assert bb["Baseline"] == [65.50] and bb["MMPareto"] == [79.97] and len(bb) == 20
    assert dict(av["kinetics_sounds"][0].rows)["Modality-valuation"] == [68.01]
    assert all("selected on test" in t.protocol for ts in av.values() for t in ts)
