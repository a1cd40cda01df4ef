"""The leaderboard as a static website: ``python -m mmbalance.leaderboard build SUITE`` writes it to ``site/``
beside the markdown report (``--format site`` asks for it explicitly).

Self-contained: plain HTML pages, one small CSS and JavaScript file of our own (``assets/``), SVG figures drawn
at build time, the downloads (results.csv, tuning.csv, results.tex); no server, no network, no CDN — it opens
from ``file://`` and from any static host. Pages:

* ``index.html`` — findings, protocol, code version, datasets, every row across datasets (probability of
  improvement over the baseline, average rank), reference rows (a suite's ``[reference]`` table), downloads;
* ``datasets/NAME.html`` — the compact table (sortable, filterable by method family), the forest plot of Δ
  and the fused-metric vs weak-probe plot; ``datasets/NAME-detail.html`` — every results.csv column;
* ``methods/index.html`` and ``methods/ROW.html`` — description and docs page, numbers on every dataset with
  CIs, configuration and tuning trials, training curves with their seed spread, the run folders.

Everything comes from the built :class:`~mmbalance.leaderboard.report.Report` (:mod:`.model`), never from
the run files; the same report gives the same bytes (:mod:`.figures`). Written into a staging folder and
swapped in at the end, so a failed build leaves the previous site as it was.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from ...errors import RunFileWriteError
from ...runfiles import atomic_write_text
from ..report import Report
from . import figures as figs
from . import pages
from .model import SiteData, docs_page, repo_root, site_data

SITE_DIR = "site"
ASSETS = ("site.css", "site.js")


def render_site(rep: Report, dest: Path, *, downloads: dict[str, str] | None = None,
                tuning: dict[tuple[str, str], dict[str, Any]] | None = None, final_dir: Path | None = None) -> int:
    """Write every page, figure, asset and download into ``dest``; returns the number of files written.
    ``tuning``: (dataset, row) → the row's tune.json; ``final_dir``: where the site will live (for the
    relative links to the repository's docs/ and the run folders' display paths)."""
    final = (final_dir or dest).resolve()
    site = site_data(rep)
    site.downloads = sorted(downloads or {})
    dest.mkdir(parents=True, exist_ok=True)
    written = 0

    def write(rel: str, text: str) -> None:
        nonlocal written
        atomic_write_text(dest / rel, text)
        written += 1

    for name in ASSETS:
        write(f"assets/{name}", resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8"))
    for name, content in sorted((downloads or {}).items()):
        write(f"downloads/{name}", content)

    figures: dict[str, str] = {}  # key → path relative to the site root
    for ds in site.datasets:
        if not ds.metric:
            continue
        for key, fn in (("forest", figs.forest), ("probe", figs.probe_scatter)):
            rel = f"figures/{ds.name}-{key}.svg"
            if fn(ds, dest / rel):
                figures[f"{ds.name}:{key}"] = rel
                written += 1
    poi = [(n, *m.poi[:3]) for n, m in site.methods.items() if m.poi is not None]
    if poi and figs.poi_chart(poi, rep.suite.baseline, max(m.poi[3] for m in site.methods.values() if m.poi),
                              dest / "figures/poi.svg"):
        figures["poi"] = "figures/poi.svg"
        written += 1
    for name, m in site.methods.items():
        for ds in site.datasets:
            r = ds.row(name)
            if r is None or not r.summary.curves:
                continue
            rel = f"figures/methods/{m.page[:-5]}/{ds.name}-curves.svg"
            if figs.curves(name, ds.name, ds.metric, ds.summary.modalities, r.summary.curves, dest / rel):
                figures[f"curves:{name}:{ds.name}"] = rel
                written += 1

    def under(prefix: str) -> dict[str, str]:
        return {k: prefix + v for k, v in figures.items()}

    write("index.html", pages.overview(site, figures))
    for ds in site.datasets:
        write(f"datasets/{ds.name}.html", pages.dataset_page(site, ds, under("../")))
        write(f"datasets/{ds.name}-detail.html", pages.detail_page(site, ds))
    write("methods/index.html", pages.methods_index(site))
    root = repo_root()
    inside = _is_within(final, root)
    run_root = root if inside else None
    for name, m in site.methods.items():
        doc = docs_page(m.method) if inside else None
        link = pages.rel(doc, final / "methods") if doc is not None else None
        t = {ds.name: (tuning or {}).get((ds.name, name)) for ds in site.datasets}
        write(f"methods/{m.page}", pages.method_page(site, m, under("../"), {k: v for k, v in t.items() if v},
                                                      run_root, link))
    return written


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def write_site(rep: Report, out_dir: str | Path, **kwargs: Any) -> Path:
    """Render the site into ``out_dir/site`` (staged, then swapped in); returns the site folder."""
    out = Path(out_dir)
    final = out / SITE_DIR
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".site.", suffix=".tmp", dir=out))
    except OSError as exc:
        raise RunFileWriteError(f"cannot write the site into {str(out)!r}: {exc.strerror or exc}") from None
    old = None
    try:
        try:
            render_site(rep, stage, final_dir=final, **kwargs)
            _chmod_tree(stage)
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=".site-old.", suffix=".tmp", dir=out))
                os.replace(final, old / SITE_DIR)
            os.replace(stage, final)
        except OSError as exc:
            raise RunFileWriteError(f"cannot write the site into {str(final)!r}: {exc.strerror or exc}; the previous "
                                    "site is unchanged") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _chmod_tree(path: Path) -> None:
    """Folders 0755 and files 0644 minus the umask (mkdtemp makes the staging folder 0700)."""
    from ...runfiles import current_umask

    mask = current_umask()
    for p in [path, *path.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


__all__ = ["SITE_DIR", "SiteData", "render_site", "write_site"]
