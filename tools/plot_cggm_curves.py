"""Draw CGGM's per-epoch curves (paper Fig. 2/3/7 style) from a run's metrics.jsonl.

Panels: balancing term B_i, classifier metric ε_i, encoder gradient norm after modulation, and the
per-modality validation accuracy of the fused model (others absent), one line per modality.

    python tools/plot_cggm_curves.py runs/mfeat/cggm/seed0 [--out curves.png]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = [("cggm/B/", "balancing term B"), ("cggm/eps/", "classifier metric ε"),
          ("cggm/grad_norm/", "encoder gradient norm (modulated)")]


def load_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (expected a run directory written by mmbalance.run)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(run_dir)
    keys = sorted({k for r in rows for k in r})
    if not any(k.startswith("cggm/B/") for k in keys):
        raise SystemExit(f"error: {run_dir} has no cggm/B/* columns; is it a CGGM run?")
    epochs = list(range(len(rows)))
    fig, axes = plt.subplots(1, len(PANELS) + 1, figsize=(4.2 * (len(PANELS) + 1), 3.4))
    for ax, (prefix, title) in zip(axes, PANELS):
        for k in (k for k in keys if k.startswith(prefix)):
            ax.plot(epochs, [r.get(k, float("nan")) for r in rows], label=k[len(prefix):])
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    ax = axes[-1]
    mods = sorted({m for r in rows for m in (r.get("val_per_modality") or {})})
    for m in mods:
        ax.plot(epochs, [((r.get("val_per_modality") or {}).get(m) or {}).get("accuracy", float("nan")) for r in rows],
                label=m)
    ax.set_title("val accuracy, one modality present")
    ax.set_xlabel("epoch")
    if mods:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    out = plot(args.run_dir, args.out or args.run_dir / "cggm_curves.png")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
