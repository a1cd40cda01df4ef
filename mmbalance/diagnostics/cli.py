"""``python -m mmbalance.diagnose RUN_DIR [RUN_DIR ...]``: figures and a summary of finished runs'
imbalance diagnostics (docs/diagnostics.md).

Exit codes: 0 ok; 2 bad input (a path that is not a folder, a folder without a readable result.json, a
run without diagnostics and no ``--recompute``, ``--recompute`` on a run without ``checkpoints/best.pt``);
nothing is written then.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..runfiles import CHECKPOINT_DIR, CONFIG_FILE, RESULT_FILE, atomic_write_json, atomic_write_text
from .collect import Group, RunRecord, find_run_dirs, group_runs, load_run, weak_modality
from .figures import compare_figure, dynamics_figure, probe_gap_figure, safe_name, shapley_figure


class InputError(Exception):
    """Bad input: the message names the path and what was expected."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmbalance.diagnose",
        description="Figures and a summary of the imbalance diagnostics of finished runs (probes, Shapley "
                    "values, permutation drops, training dynamics).",
        epilog="Examples:\n  python -m mmbalance.diagnose runs/mfeat\n"
               "  python -m mmbalance.diagnose leaderboard/results/quick/mfeat --out diag-mfeat\n"
               "  python -m mmbalance.diagnose --recompute old_runs/mfeat/baseline/seed0",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="RUN_DIR", help="run folders or any parent folder of runs")
    p.add_argument("--out", default="diagnostics", help="output folder (default: ./diagnostics)")
    p.add_argument("--split", choices=["test", "val"], default="test", help="split of the probes and Shapley values")
    p.add_argument("--recompute", action="store_true",
                   help="runs without diagnostics: rebuild data, model and method from config.json, load "
                        "checkpoints/best.pt and add probes, Shapley values and permutation drops to result.json "
                        "(training dynamics cannot be back-filled)")
    p.add_argument("--compare", default="conf_ratio", metavar="QUANTITY",
                   help="per-epoch quantity of the weak modality compared across rows (default conf_ratio; also "
                        "val, grad_norm_raw, grad_ratio, edit_ratio, cos_uni_fused, conflict_rate, conf)")
    p.add_argument("--format", choices=["md", "csv"], default="md", help="summary printed to stdout")
    return p


COMPARE_CHOICES = ("conf_ratio", "conf", "val", "grad_norm_raw", "grad_norm", "grad_ratio", "grad_sq",
                   "edit_ratio", "cos_uni_fused", "conflict_rate")


# ------------------------------------------------------------------------------------------ inputs
def collect_runs(paths: list[str]) -> list[RunRecord]:
    runs: list[RunRecord] = []
    for p in paths:
        path = Path(p)
        if not path.is_dir():
            raise InputError(f"{path}: not a folder (expected a run folder or a parent folder of runs)")
        dirs = find_run_dirs(path)
        if not dirs:
            raise InputError(f"{path}: no result.json found in this folder or below; it is not a run folder")
        for d in dirs:
            try:
                runs.append(load_run(d))
            except ValueError as exc:
                raise InputError(str(exc)) from None
    ok = [r for r in runs if r.result.get("status") == "ok"]
    if not ok:
        raise InputError(f"{', '.join(paths)}: no finished run (every result.json there says failed)")
    return ok


def recompute(run: RunRecord) -> dict[str, Any]:
    """Back-fill §2–§4 for a run without diagnostics: rebuild from config.json, load best.pt."""
    import torch

    from ..config import RunConfig, TrainConfig, build_hparams
    from ..engine import Trainer
    from ..registry import create_dataset, method_entry

    best = run.path / CHECKPOINT_DIR / "best.pt"
    cfg_path = run.path / CONFIG_FILE
    if not best.is_file():
        raise InputError(f"{run.path}: no checkpoint {CHECKPOINT_DIR}/best.pt, so its diagnostics cannot be "
                         "recomputed (re-run it with the current version instead)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{cfg_path}: not a readable config.json ({exc})") from None
    from dataclasses import fields

    known = {f.name for f in fields(TrainConfig)}
    train_values = {k: v for k, v in (cfg.get("train") or {}).items() if k in known}
    if train_values.get("diagnostics", "default") == "none":
        train_values["diagnostics"] = "default"
    train_cfg = build_hparams(TrainConfig, train_values, where=f"{cfg_path} train")
    data = create_dataset(cfg["dataset"], cfg.get("data_dir"), **(cfg.get("dataset_options") or {}))
    entry = method_entry(cfg["method"])
    hp = build_hparams(entry.factory.hparams_cls, cfg.get("method_options") or {}, where=f"{cfg_path} method")
    method = entry.factory(hp)
    method.registered_name = cfg["method"]
    config = RunConfig(method=cfg["method"], dataset=cfg["dataset"], seed=int(cfg.get("seed", 0)),
                       train=cfg.get("train") or {}, method_options=cfg.get("method_options") or {},
                       dataset_options=cfg.get("dataset_options") or {}, model=cfg.get("model") or {},
                       run_dir=str(run.path), data_dir=cfg.get("data_dir"))
    with tempfile.TemporaryDirectory() as scratch:  # the Trainer never writes into the run folder here
        trainer = Trainer(config, train_cfg, data, method, Path(scratch), quiet=True)
        trainer._load_weights(torch.load(best, map_location="cpu", weights_only=False))
        test, val = trainer.evaluate(data.test), trainer.evaluate(data.val)
        test_pm, val_pm = trainer.evaluate_per_modality(data.test), trainer.evaluate_per_modality(data.val)
        block = trainer.diag.final(test=test, val=val, test_pm=test_pm, val_pm=val_pm, history=run.rows)
    block["recomputed"] = True
    if not any("diag" in r for r in run.rows):
        block["dynamics_missing"] = "training dynamics cannot be back-filled (the run predates diagnostics)"
    return block


# ------------------------------------------------------------------------------------------ summary
def _fmt(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if math.isfinite(std) else "")


def summary_columns(groups: list[Group]) -> list[str]:
    mods: list[str] = []
    for g in groups:
        for m in g.modalities:
            if m not in mods:
                mods.append(m)
    cols = []
    for q in ("probe", "gap", "phi", "share", "drop", "conf_ratio", "grad_ratio", "cos"):
        cols += [f"{q}[{m}]" for m in mods]
    return ["score", *cols[:len(mods) * 4], "imbalance_index", *cols[len(mods) * 4:]]


def summary_tables(groups: dict[tuple[str, str], Group], split: str) -> tuple[str, str, dict[str, Any]]:
    by_ds: dict[str, list[Group]] = {}
    for g in groups.values():
        by_ds.setdefault(g.dataset, []).append(g)
    md = [f"# Imbalance diagnostics ({split})", "",
          "Mean ± std over seeds; oriented units (higher = better / more use). `gap[m]` = probe of the "
          "`unimodal:m` run − probe of this row (positive: encoder m is weaker than trained alone); "
          "`—` = not available (no such reference row, or the run has no diagnostics).", ""]
    out_csv = io.StringIO()
    w = csv.writer(out_csv, lineterminator="\n")
    w.writerow(["dataset", "row", "seeds", "quantity", "mean", "std", "n"])
    js: dict[str, Any] = {}
    for ds, rows in sorted(by_ds.items()):
        cols = summary_columns(rows)
        cols = [c for c in cols if any(math.isfinite(g.mean(c)) for g in rows)]
        m_star = weak_modality(groups, ds)
        md += [f"## {ds}", "", f"weak modality: {m_star or '—'}", "",
               "| row | seeds | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
        for g in rows:
            md.append(f"| {g.row} | {len(g.runs)} | " + " | ".join(_fmt(g.mean(c), g.std(c)) for c in cols) + " |")
            js.setdefault(ds, {})[g.row] = {c: {"mean": g.mean(c), "std": g.std(c)} for c in cols}
            for c in cols:
                n = sum(1 for v in g.values.get(c, {}).values() if math.isfinite(v))
                w.writerow([ds, g.row, len(g.runs), c, _csv(g.mean(c)), _csv(g.std(c)), n])
        md.append("")
    return "\n".join(md) + "\n", out_csv.getvalue(), js


def _csv(x: float) -> str:
    return "" if not math.isfinite(x) else repr(float(x))


# ------------------------------------------------------------------------------------------ main
def run(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    if args.compare not in COMPARE_CHOICES:
        raise InputError(f"--compare {args.compare!r}: unknown quantity; valid: {', '.join(COMPARE_CHOICES)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    runs = collect_runs(args.paths)
    missing = [r for r in runs if not r.diagnostics]
    if missing and not args.recompute:
        raise InputError(f"{missing[0].path}: the run has no diagnostics (made before they existed, or with "
                         "train.diagnostics=none); add --recompute to compute them from its checkpoint"
                         + (f" ({len(missing)} such runs)" if len(missing) > 1 else ""))
    backfilled = {}
    for r in missing:
        backfilled[r.path] = recompute(r)
    # every input is valid: write
    for r in missing:
        r.result["diagnostics"] = backfilled[r.path]
        atomic_write_json(r.path / RESULT_FILE, r.result)
    groups = group_runs(runs, args.split)
    md, csv_text, js = summary_tables(groups, args.split)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("summary.md", md), ("summary.csv", csv_text),
                       ("summary.json", json.dumps(_json_safe(js), indent=2, sort_keys=True) + "\n")):
        atomic_write_text(out / name, text)
        written.append(out / name)
    by_ds: dict[str, list[Group]] = {}
    for g in groups.values():
        by_ds.setdefault(g.dataset, []).append(g)
    for ds, rows in by_ds.items():
        for g in rows:
            written += _figure(dynamics_figure, out / f"dynamics_{safe_name(ds)}_{safe_name(g.row)}.png", g)
        written += _figure(shapley_figure, out / f"shapley_{safe_name(ds)}.png", rows)
        written += _figure(probe_gap_figure, out / f"probe_gap_{safe_name(ds)}.png", rows)
        written += _figure(lambda gs, p: compare_figure(gs, args.compare, p), out / f"compare_{safe_name(ds)}.png", rows)
    print(md if args.format == "md" else csv_text, end="")
    print(f"wrote {len(written)} files to {out}", file=sys.stderr)
    return written


def _figure(fn, path: Path, arg) -> list[Path]:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if not fn(arg, tmp):
            return []
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return [path]


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    return x


def main(argv: list[str] | None = None) -> int:
    from ..errors import MMBalanceError

    try:
        run(argv)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MMBalanceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
