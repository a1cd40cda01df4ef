"""The leaderboard's static site: built from a fixture suite's run files (fake results with diagnostics and
per-epoch curves), checked as files (byte-identical rebuild, self-contained, every link and image resolves,
page sizes) and in a real browser — Debian's chromium driven headless by selenium: no console errors, every
image loads, sorting a column orders the rows as results.csv does, the method-family filter, a method page
shows results.csv's numbers, and the pages work with JavaScript disabled.

The browser must be there: without chromium/chromedriver/selenium the browser tests fail, unless
``MMBALANCE_SKIP_BROWSER=1`` says to skip them (local machines without a browser; CI installs one, see .ci/run).
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from test_leaderboard import _fake_diagnostics, make_fixture

from mmbalance.runfiles import atomic_write_json

MAX_PAGE_BYTES = 1_000_000


def _fake_curves(spec, acc: float, mods: list[str]) -> str:
    """Three epochs of metrics.jsonl; seed-dependent so the min–max band is not empty."""
    lines = []
    for ep in range(3):
        v = round(acc - 0.1 * (2 - ep) + 0.001 * spec.seed, 6)
        lines.append(json.dumps({
            "epoch": ep, "phase": "joint", "train_loss": 2.0 / (ep + 1) + 0.01 * spec.seed,
            "val": {"accuracy": v}, "val_per_modality": {m: {"accuracy": v - 0.1 * (i + 1)} for i, m in enumerate(mods)},
            "diag": {"grad_ratio": {m: 1.0 + 0.5 * i * ep for i, m in enumerate(mods)},
                     "conf_ratio": {m: 1.0 - 0.1 * i * ep for i, m in enumerate(mods)}}}))
    return "\n".join(lines) + "\n"


REFERENCE = """
[[reference.mfeat]]
source = "Someone et al. (2024), Table 2"
protocol = "their split, 1 seed, epoch selected on test"
metrics = ["accuracy"]
rows = [["Baseline", "65.50"], ["Their method", 67.76], ["Not reported", "-"]]
"""


def _site_fixture(root: Path):
    suite, specs = make_fixture(root)
    with open(suite.path, "a") as fh:  # published numbers: shown in their own block, never in results.csv
        fh.write(REFERENCE)
    for spec in specs:
        res_path = Path(spec.run_dir) / "result.json"
        if not res_path.is_file():
            continue
        res = json.loads(res_path.read_text())
        if res.get("status") != "ok":
            continue
        res["diagnostics"] = _fake_diagnostics(spec.row, spec.seed, res["modalities"])
        res["code"] = {"git_commit": "0123456789abcdef0123", "dirty": False}
        atomic_write_json(res_path, res)
        (Path(spec.run_dir) / "metrics.jsonl").write_text(_fake_curves(spec, res["test"]["accuracy"], res["modalities"]))
    return suite, specs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The fixture suite built twice (two output folders) with the real CLI."""
    from mmbalance.leaderboard import main

    root = tmp_path_factory.mktemp("site")
    suite, specs = _site_fixture(root)
    for out in ("out1", "out2"):
        assert main(["build", str(suite.path), "--results-dir", str(root / "results"), "--out-dir",
                     str(root / out)]) == 0
    return root, suite, specs


def _csv_rows(out: Path, dataset: str) -> list[dict[str, str]]:
    with open(out / "results.csv") as fh:
        return [r for r in csv.DictReader(fh) if r["dataset"] == dataset]


# ------------------------------------------------------------------------------------------ files
class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if a.get(key) is not None:
                self.refs.append((tag, a[key]))


def test_site_is_byte_identical_self_contained_and_every_link_resolves(built):
    root, _, _ = built
    site1, site2 = root / "out1" / "site", root / "out2" / "site"
    files = sorted(p.relative_to(site1) for p in site1.rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {"index.html", "datasets/mfeat.html", "datasets/mfeat-detail.html",
                                       "methods/index.html", "methods/alpha.html", "methods/unimodal-fac.html",
                                       "assets/site.js", "assets/site.css", "downloads/results.csv",
                                       "downloads/results.tex", "figures/mfeat-forest.svg", "figures/mfeat-probe.svg",
                                       "figures/poi.svg", "figures/methods/alpha/mfeat-curves.svg"}
    assert files == sorted(p.relative_to(site2) for p in site2.rglob("*") if p.is_file())
    for f in files:
        assert (site1 / f).read_bytes() == (site2 / f).read_bytes(), f"{f} differs between two builds"
    # the downloads are the report's own files, byte for byte
    assert (site1 / "downloads" / "results.csv").read_bytes() == (root / "out1" / "results.csv").read_bytes()
    # published numbers: on the overview and the dataset's page, as printed, labelled, not in results.csv
    for page in ("index.html", "datasets/mfeat.html"):
        text = (site1 / page).read_text()
        assert "Published numbers (reference only, not comparable)" in text and ">65.50<" in text, page
        assert "Someone et al. (2024), Table 2" in text and "epoch selected on test" in text
    assert "Published numbers" not in (site1 / "datasets" / "mfeat-hard.html").read_text()
    assert "Their method" not in (site1 / "downloads" / "results.csv").read_text()
    # alpha is 0.03 above the baseline on both datasets while the seeds differ by at most 0.009: every run of
    # alpha beats every baseline run, so P(alpha > baseline) = 1 with a degenerate interval (rliable's definition)
    assert "across 2 dataset(s): 1.000 [1.000, 1.000]" in (site1 / "methods" / "alpha.html").read_text()
    # the markdown report links to the site
    assert "](site/index.html)" in (root / "out1" / "README.md").read_text()
    pages = [f for f in files if f.suffix == ".html"]
    parsed = {}
    for f in pages:
        p = _Refs()
        p.feed((site1 / f).read_text(encoding="utf-8"))
        parsed[f] = p
    for f in pages:
        size = (site1 / f).stat().st_size
        assert size < MAX_PAGE_BYTES, f"{f}: {size} bytes"
        for tag, ref in parsed[f].refs:
            url = urlparse(ref)
            assert url.scheme in ("", "data"), f"{f}: external reference {ref!r} (the site must work offline)"
            if url.scheme == "data":
                continue
            target = (site1 / f).parent / unquote(url.path) if url.path else site1 / f
            assert target.resolve().is_file(), f"{f}: <{tag}> {ref!r} does not resolve"
            assert _within(target.resolve(), site1.resolve()), f"{f}: {ref!r} leaves the site folder"
            if url.fragment and target.suffix == ".html":
                rel = target.resolve().relative_to(site1.resolve())
                assert url.fragment in parsed[rel].ids, f"{f}: anchor {ref!r} missing"
    for svg in site1.rglob("*.svg"):
        text = svg.read_text()
        assert "<svg" in text and not re.search(r'(?:href|src)="https?:|url\(\s*https?:', text), svg
        assert not re.search(r"<dc:date>", text), f"{svg}: a date makes the build non-reproducible"


def _within(p: Path, root: Path) -> bool:
    try:
        p.relative_to(root)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------ browser
def _browser(js: bool = True):
    skip = os.environ.get("MMBALANCE_SKIP_BROWSER") == "1"
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    if webdriver is None or chromium is None or driver_bin is None:
        msg = ("the browser test needs Debian's chromium and chromium-driver and the selenium package "
               "(apt-get install chromium chromium-driver; pip install selenium); set MMBALANCE_SKIP_BROWSER=1 "
               "to skip it locally")
        if skip:
            pytest.skip(msg)
        pytest.fail(msg)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                 "--allow-file-access-from-files"):
        opts.add_argument(flag)
    import tempfile

    profile = tempfile.mkdtemp(prefix="mmbalance-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    if not js:
        opts.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=driver_bin), options=opts)
    drv.set_page_load_timeout(30)
    drv._mmbalance_profile = profile
    return drv


@pytest.fixture(scope="module")
def browser():
    drv = _browser(js=True)
    yield drv
    drv.quit()
    shutil.rmtree(drv._mmbalance_profile, ignore_errors=True)


def _open(drv, path: Path) -> None:
    drv.get(path.resolve().as_uri())


def _rows(drv, table_id: str) -> list[str]:
    return drv.execute_script(
        "return Array.from(document.querySelectorAll('#' + arguments[0] + ' tbody tr'))"
        ".filter(r => !r.hidden).map(r => r.getAttribute('data-row'));", table_id)


def test_every_page_loads_without_console_errors_and_every_image_renders(built, browser):
    root, _, _ = built
    site = root / "out1" / "site"
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 10
    for page in pages:
        _open(browser, page)
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, f"{page.relative_to(site)}: {errors}"
        bad = browser.execute_async_script(  # figures load lazily: load them all, then ask which failed
            "const done = arguments[arguments.length - 1];"
            "const imgs = Array.from(document.images); imgs.forEach(i => { i.loading = 'eager'; });"
            "Promise.all(imgs.map(i => i.decode().catch(() => null)))"
            ".then(() => done(imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'))));")
        assert not bad, f"{page.relative_to(site)}: images that do not load: {bad}"
        assert browser.execute_script("return document.querySelectorAll('th button').length") > 0 or \
            not browser.execute_script("return document.querySelectorAll('table.sortable').length"), page


def _expected_order(before: list[str], rows: list[dict[str, str]], key: str, descending: bool) -> list[str]:
    """Rows shown ``before`` the click, stably sorted by the CSV column ``key``; empty cells last."""
    value = {r["method"]: float(r[key]) if r.get(key) else math.nan for r in rows}
    present = [m for m in before if math.isfinite(value[m])]
    missing = [m for m in before if not math.isfinite(value[m])]
    return sorted(present, key=lambda m: -value[m] if descending else value[m]) + missing


def test_sorting_orders_rows_as_the_csv_and_the_family_filter_hides_rows(built, browser):
    from selenium.webdriver.common.by import By

    root, _, _ = built
    out = root / "out1"
    _open(browser, out / "site" / "datasets" / "mfeat.html")
    csv_rows = _csv_rows(out, "mfeat")
    assert _rows(browser, "table-mfeat") == [r["method"] for r in csv_rows]  # page order = results.csv order
    heads = browser.find_elements(By.CSS_SELECTOR, "#table-mfeat thead th")
    labels = [h.text.strip() for h in heads]
    for label, key in (("accuracy", "test_accuracy_mean"), ("probe [fou]", "diag_probe_fou_mean"),
                       ("p (Holm)", "p_ttest_holm"), ("train s/run", "train_seconds_mean")):
        btn = heads[labels.index(label)].find_element(By.TAG_NAME, "button")
        before = _rows(browser, "table-mfeat")
        btn.click()  # numbers: largest first
        after = _rows(browser, "table-mfeat")
        assert after == _expected_order(before, csv_rows, key, True), label
        assert heads[labels.index(label)].get_attribute("aria-sort") == "descending"
        btn.click()
        assert _rows(browser, "table-mfeat") == _expected_order(after, csv_rows, key, False), label
    heads[labels.index("method")].find_element(By.TAG_NAME, "button").click()
    assert _rows(browser, "table-mfeat") == sorted(r["method"] for r in csv_rows)
    # the family filter: unimodal rows only (the baseline stays as the reference line)
    select = browser.find_element(By.CSS_SELECTOR, "label.filter select")
    from selenium.webdriver.support.ui import Select

    Select(select).select_by_value("unimodal")
    assert sorted(_rows(browser, "table-mfeat")) == ["baseline", "unimodal:fac", "unimodal:fou"]
    Select(select).select_by_value("")
    assert len(_rows(browser, "table-mfeat")) == len(csv_rows)


def test_method_page_shows_the_numbers_of_results_csv(built, browser):
    from selenium.webdriver.common.by import By

    root, _, _ = built
    out = root / "out1"
    _open(browser, out / "site" / "methods" / "alpha.html")
    for ds in ("mfeat", "mfeat-hard"):
        rec = next(r for r in _csv_rows(out, ds) if r["method"] == "alpha")
        row = browser.find_element(By.CSS_SELECTOR, f'#numbers tr[data-dataset="{ds}"]')
        text = row.text
        assert f"{float(rec['test_accuracy_mean']):.4f} ± {float(rec['test_accuracy_std']):.4f}" in text, text
        assert f"{float(rec['delta']):+.4f} [{float(rec['ci_low']):+.4f}, {float(rec['ci_high']):+.4f}]" in text, text
        p = float(rec["p_ttest_holm"])
        assert (f"{p:.4f}" if p >= 1e-4 else "<0.0001") in text
    # five run folders per dataset, and the curves of both datasets
    page = browser.page_source
    assert page.count("results/mfeat/alpha/seed") == 5 and page.count("results/mfeat-hard/alpha/seed") == 5
    assert "alpha/mfeat-curves.svg" in page and "alpha/mfeat-hard-curves.svg" in page
    # the failed seed of gamma is listed with its error, and counted
    _open(browser, out / "site" / "methods" / "gamma.html")
    assert "failed: loss is nan at epoch 2" in browser.page_source


def test_pages_work_without_javascript(built):
    from selenium.webdriver.common.by import By

    root, _, _ = built
    out = root / "out1"
    drv = _browser(js=False)
    try:
        _open(drv, out / "site" / "datasets" / "mfeat.html")
        rows = drv.find_elements(By.CSS_SELECTOR, "#table-mfeat tbody tr")
        assert [r.get_attribute("data-row") for r in rows] == [r["method"] for r in _csv_rows(out, "mfeat")]
        assert not drv.find_elements(By.CSS_SELECTOR, "th button")  # the script did not run
        assert not drv.find_elements(By.CSS_SELECTOR, "label.filter")
        assert "0.9" in rows[0].text
        _open(drv, out / "site" / "index.html")
        assert drv.find_elements(By.CSS_SELECTOR, "#methods tbody tr")
    finally:
        drv.quit()
        shutil.rmtree(drv._mmbalance_profile, ignore_errors=True)


# ------------------------------------------------------------------------------------------ curves
def test_curves_from_the_store_equal_those_from_the_run_folders(tmp_path):
    """The site's curves come from the store once the run folders are gone: the same series, including the
    per-modality validation metric and the two dynamics (a store that dropped them would draw empty panels)."""
    from mmbalance.leaderboard import store
    from mmbalance.leaderboard.report import build_report

    suite, specs = _site_fixture(tmp_path)
    specs = [s for s in specs if s.dataset == "mfeat"]
    before = {(d.name, r.row): r.curves for d in build_report(suite, specs).datasets for r in d.rows.values()}
    alpha = before[("mfeat", "alpha")][2]
    acc = json.loads((Path(specs[0].run_dir).parent.parent / "alpha" / "seed2" / "result.json").read_text())
    acc = acc["test"]["accuracy"]
    # the fixture's closed forms (see _fake_curves), epoch e = 0, 1, 2 plotted as 1, 2, 3
    assert alpha["epoch"] == [1.0, 2.0, 3.0]
    assert alpha["val"] == pytest.approx([round(acc - 0.1 * (2 - e) + 0.002, 6) for e in range(3)])
    assert alpha["val[fou]"] == pytest.approx([round(acc - 0.1 * (2 - e) + 0.002, 6) - 0.2 for e in range(3)])
    assert alpha["grad_ratio[fou]"] == [1.0, 1.5, 2.0] and alpha["conf_ratio[fac]"] == [1.0, 1.0, 1.0]
    assert alpha["train_loss"] == pytest.approx([2.02, 1.02, 2.0 / 3 + 0.02])
    store.sync(specs)
    shutil.rmtree(tmp_path / "results" / "mfeat")
    after = {(d.name, r.row): r.curves for d in build_report(suite, specs).datasets for r in d.rows.values()}
    assert after == before


def test_a_column_the_report_gains_shows_on_the_detail_page_and_a_lost_one_leaves_the_table(tmp_path, monkeypatch):
    """The site follows results.csv: a new column appears on the dataset's detail page (mean ± std pairs
    merged), and the compact table drops a column the report no longer has instead of failing."""
    from mmbalance.leaderboard.report import build_report, csv_records
    from mmbalance.leaderboard.site import model, pages

    suite, specs = _site_fixture(tmp_path)

    def records(rep):
        cols, rows = csv_records(rep)
        for r in rows:
            r["mde_accuracy_mean"], r["mde_accuracy_std"] = "0.0123", "0.001"
            r.pop("p_ttest_holm", None)
        return [c for c in cols if c != "p_ttest_holm"] + ["mde_accuracy_mean", "mde_accuracy_std"], rows

    monkeypatch.setattr(model, "csv_records", records)
    site = model.site_data(build_report(suite, specs))
    ds = site.datasets[0]
    detail = pages.detail_page(site, ds)
    assert ">mde_accuracy<" in detail and "0.0123 ± 0.0010" in detail
    compact = pages.compact_table(site, ds, "../")
    assert "p (Holm)" not in compact and "Δ vs baseline" in compact


def test_a_failed_site_build_leaves_the_previous_site(tmp_path, monkeypatch):
    """Rendering happens in a staging folder: a failure half-way (here: a full disk while drawing the first
    figure) raises a one-line error and leaves the previous site and nothing else."""
    from mmbalance.errors import RunFileWriteError
    from mmbalance.leaderboard.report import build_report
    from mmbalance.leaderboard.site import figures, write_site

    suite, specs = _site_fixture(tmp_path)
    out = tmp_path / "out"
    (out / "site").mkdir(parents=True)
    (out / "site" / "index.html").write_text("previous site")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(figures, "forest", full_disk)
    with pytest.raises(RunFileWriteError, match="No space left on device; the previous site is unchanged"):
        write_site(build_report(suite, specs), out)
    assert (out / "site" / "index.html").read_text() == "previous site"
    assert sorted(p.name for p in out.iterdir()) == ["site"]  # no staging folder left behind
