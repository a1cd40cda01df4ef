"""Published numbers shown beside a suite's results: the ``[reference]`` table of a suite file.

Each dataset of the suite may list tables of numbers copied from papers or benchmark READMEs, each with
its source and the protocol that produced it (split, seeds, how the checkpoint was selected)::

    [[reference.cremad-legacy]]
    source = "BalanceBenchmark README (Xu et al., 2025)"
    protocol = "OGM-GE train/test lists, 1 seed, epoch selected on test"
    note = "encoders not stated"          # optional
    metrics = ["accuracy"]
    rows = [["Baseline", 65.50], ["OGM", 67.76], ["Greedy", "-"]]   # "-": not reported; "65.50": kept as written

Numbers are printed with the most decimals any value of their column has (TOML keeps 65.50 as 65.5).

They are rendered in their own labelled block under the dataset's table, exactly as published, and are
never tested against, ranked with or averaged into the suite's own rows: their splits, preprocessing,
models and selection rules differ from the suite's (the protocol line says how).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

MISSING = "-"


@dataclass
class ReferenceTable:
    source: str
    protocol: str
    metrics: list[str]
    rows: list[tuple[str, list[float | None]]]
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Printed(float):
    """A value given as text (``"65.50"``): rendered exactly as written."""

    text: str

    def __new__(cls, text: str) -> Printed:
        obj = super().__new__(cls, float(text))
        obj.text = text.strip()
        return obj


def _value(v: Any, where: str) -> float | None:
    if isinstance(v, str) and v.strip() == MISSING:
        return None
    if isinstance(v, str):
        try:
            return Printed(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where}: a value must be a number (or a number as text, kept as written) or "
                          f"\"{MISSING}\" (not reported), got {v!r}")
    return float(v)


def parse_reference(raw: Any, where: str, datasets: list[str]) -> dict[str, list[ReferenceTable]]:
    """Validate the ``[reference]`` table of a suite: dataset → list of :class:`ReferenceTable`."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} 'reference': expected a table of datasets, got {raw!r}")
    out: dict[str, list[ReferenceTable]] = {}
    for ds, tables in raw.items():
        w = f"{where} reference.{ds}"
        if ds not in datasets:
            raise ConfigError(f"{w}: {ds!r} is not a dataset of this suite ({', '.join(datasets)})")
        if isinstance(tables, dict):
            tables = [tables]
        if not isinstance(tables, list) or not tables:
            raise ConfigError(f"{w}: expected one or more tables ([[reference.{ds}]]), got {tables!r}")
        parsed = []
        for k, t in enumerate(tables):
            wk = f"{w}[{k}]"
            if not isinstance(t, dict):
                raise ConfigError(f"{wk}: expected a table, got {t!r}")
            unknown = sorted(set(t) - {"source", "protocol", "metrics", "rows", "note"})
            if unknown:
                raise ConfigError(f"{wk}: unknown key(s) {', '.join(unknown)}; valid: source, protocol, metrics, rows, "
                                  "note")
            for key in ("source", "protocol"):
                if not isinstance(t.get(key), str) or not t[key].strip():
                    raise ConfigError(f"{wk}: '{key}' must be a non-empty string (every published number needs its "
                                      "source and the protocol that produced it)")
            metrics = t.get("metrics")
            if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
                raise ConfigError(f"{wk}: 'metrics' must be a non-empty list of column names, got {metrics!r}")
            rows_raw = t.get("rows")
            if not isinstance(rows_raw, list) or not rows_raw:
                raise ConfigError(f"{wk}: 'rows' must be a non-empty list of [label, value, ...], got {rows_raw!r}")
            rows = []
            for r in rows_raw:
                if not isinstance(r, list) or len(r) != len(metrics) + 1 or not isinstance(r[0], str):
                    raise ConfigError(f"{wk}: row {r!r} must be [label, {len(metrics)} value(s)] for metrics "
                                      f"{metrics}")
                rows.append((r[0], [_value(v, f"{wk} row {r[0]!r}") for v in r[1:]]))
            parsed.append(ReferenceTable(t["source"].strip(), t["protocol"].strip(), list(metrics), rows,
                                         str(t.get("note", "")).strip()))
        out[ds] = parsed
    return out


def _decimals(v: float) -> int:
    text = repr(v)
    return 0 if "e" in text or "." not in text else len(text.split(".")[1].rstrip("0"))


def column_formats(rows: list[tuple[str, list[float | None]]], n: int) -> list[int]:
    """Decimals per column: the most any value of the column shows (TOML drops trailing zeros, so 62.00 and
    66.18 in one column print as 62.00 and 66.18 again)."""
    return [max([_decimals(vals[k]) for _, vals in rows if vals[k] is not None] or [0]) for k in range(n)]


def format_value(v: float | None, decimals: int) -> str:
    if v is None:
        return MISSING
    return v.text if isinstance(v, Printed) else f"{v:.{decimals}f}"


def section(tables: list[ReferenceTable], table: Callable[[list[str], list[list[str]]], str]) -> list[str]:
    """Markdown lines of a dataset's published-numbers block (empty without reference tables)."""
    if not tables:
        return []
    lines = ["### Published numbers (reference only, not comparable)", "",
             "Copied as published, each with the protocol that produced it. They are never tested against, ranked "
             "with or averaged into the rows above: splits, preprocessing, models and checkpoint selection differ "
             "(many were selected on the test split from a single run).", ""]
    for t in tables:
        note = f" {t.note}" if t.note else ""
        lines += [f"**{t.source}** — protocol: {t.protocol}.{note}", ""]
        dec = column_formats(t.rows, len(t.metrics))
        lines += [table(["published row"] + t.metrics, [[label] + [format_value(v, d) for v, d in zip(vals, dec)]
                                                         for label, vals in t.rows]), ""]
    return lines
