"""Method passes: a method's training time split into its passes (forward passes, backward passes, optimizer
steps) and the rest (the method's own arithmetic, its bookkeeping, the engine's per-step Python), per step,
next to the baseline's, from paired, interleaved runs on mfeat with the CPU clock.

Why: issue 21 asks a method with inherent extra passes (AGM's coalitions, MMPareto's second backward, MLA's
sub-steps, G-Blending's estimates) to cost at most 1.2× the sum of its passes, and a method without extra
passes at most 1.3× the baseline. This script prints, per method, what its passes cost, how many it makes per
step, and total / Σ passes; the baseline's own total / Σ passes is the reference (the engine's per-step
overhead around one forward, one backward and one optimizer step).

What is timed (``time.process_time``, this process's CPU time, one torch thread; only inside
``Trainer._train_epoch``, the scope of ``timings.train_seconds``: the steps and the method's per-epoch hooks):

- forward: every outermost ``nn.Module`` call (a global forward pre-/post-hook pair; a module called inside
  another is part of the outer call) — the model's encoders/fusion/head, the method's own modules
  (classifiers, probes, unimodal heads), with or without grad, and the sub-networks of G-Blending's estimates;
- backward: every ``torch.autograd.backward`` (``loss.backward()``) and ``torch.autograd.grad`` call;
- optimizer: every ``Optimizer.step`` (global step hooks) and ``Optimizer.zero_grad``;
- rest: the epoch's time minus the three. A pass started inside another is counted in the outer one.

The hooks cost a little (two Python calls per module call, about 0.2 µs each, and two clock reads per
timed pass); they are paid by the method and the baseline alike, and the totals here are therefore a few
per cent above ``method_overhead.py``'s, which times the same epochs without hooks.

    python benchmarks/method_passes.py [--methods agm mmpareto mla gblending] [--epochs 10] [--repeats 3]
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MMBALANCE_NO_PROGRESS", "1")

from _paired import interleaved, median_range, time_train_epochs  # noqa: E402

DATASET = "mfeat"
DEFAULT_METHODS = ["agm", "mmpareto", "mla", "gblending", "ogm_ge", "cggm", "qmf", "inforeg"]
#: methods whose extra passes are inherent (goal: total ≤ 1.2 × Σ passes); the others: ≤ 1.3 × baseline
PASS_GOAL = {"agm": 1.2, "mmpareto": 1.2, "mla": 1.2, "mla_released": 1.2, "gblending": 1.2,
             "gblending_offline": 1.2, "gblending_offline_robust": 1.2}
BASELINE_GOAL = 1.3
KINDS = ("forward", "backward", "optimizer")


class PassClock:
    """Accumulates CPU seconds and counts of the outermost passes while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.depth = 0  # > 0 inside a timed pass (nested passes belong to it)
        self.t0 = 0.0
        self.seconds = dict.fromkeys(KINDS, 0.0)
        self.calls = dict.fromkeys(KINDS, 0)
        self._undo: list = []

    def enter(self) -> None:
        self.depth += 1
        if self.depth == 1 and self.active:
            self.t0 = time.process_time()

    def leave(self, kind: str, count: bool = True) -> None:
        self.depth -= 1
        if self.depth == 0 and self.active:
            self.seconds[kind] += time.process_time() - self.t0
            self.calls[kind] += count

    def timed(self, kind: str, fn, count: bool = True):
        def wrapper(*a, **k):
            self.enter()
            try:
                return fn(*a, **k)
            finally:
                self.leave(kind, count)
        wrapper.__wrapped__ = fn
        return wrapper

    def install(self) -> None:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        handles = [register_module_forward_pre_hook(lambda mod, args: self.enter()),
                   register_module_forward_hook(lambda mod, args, out: self.leave("forward"), always_call=True),
                   register_optimizer_step_pre_hook(lambda opt, args, kwargs: self.enter()),
                   register_optimizer_step_post_hook(lambda opt, args, kwargs: self.leave("optimizer"))]
        self._undo = [h.remove for h in handles]
        for owner, name, kind in ((torch.autograd, "backward", "backward"), (torch.autograd, "grad", "backward"),
                                  (torch.optim.Optimizer, "zero_grad", "optimizer")):
            orig = getattr(owner, name)
            setattr(owner, name, self.timed(kind, orig, count=name != "zero_grad"))  # steps counted, not zero_grad
            self._undo.append(lambda owner=owner, name=name, orig=orig: setattr(owner, name, orig))

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []


def measure(method: str, epochs: int) -> dict[str, float]:
    """Per training step: total and per-kind CPU µs, and per-kind calls, of one run."""
    from mmbalance.testing import build_trainer

    clock = PassClock()
    with tempfile.TemporaryDirectory() as tmp:
        tr = build_trainer(method, DATASET, run_dir=Path(tmp), epochs=epochs,
                           sets={"train.modality_eval": "none", "train.diagnostics": "none"})
        total = time_train_epochs(tr, on_enter=lambda: setattr(clock, "active", True),
                                  on_leave=lambda: setattr(clock, "active", False))
        clock.install()
        try:
            res = tr.fit()
        finally:
            clock.remove()
        steps = res["timings"]["epochs"] * len(tr.loader_train)
    out = {"total": total[0] / steps * 1e6, "steps": steps}
    for k in KINDS:
        out[k] = clock.seconds[k] / steps * 1e6
        out[f"n_{k}"] = clock.calls[k] / steps
    out["passes"] = sum(out[k] for k in KINDS)
    out["rest"] = out["total"] - out["passes"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved (method, baseline) pairs per method")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from mmbalance.registry import list_methods

    unknown = [m for m in args.methods if m not in list_methods()]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}")
    t_start = time.perf_counter()
    measure("baseline", 2)  # warm-up
    rows = []
    base_runs: list[dict[str, float]] = []
    for m in args.methods:
        measure(m, 2)  # warm-up
        runs, bases = interleaved(functools.partial(measure, m, args.epochs), lambda: measure("baseline", args.epochs),
                                  args.repeats)
        base_runs += bases
        rows.append((m, runs, bases))
    med = {k: statistics.median(b[k] for b in base_runs) for k in ("total", *KINDS, "rest")}
    print(f"{DATASET}, {args.epochs} epochs per run, {args.repeats} interleaved (method, baseline) pairs per "
          f"method, CPU clock, one thread. Baseline per step (median of its {len(base_runs)} runs): total "
          f"{med['total']:.0f} µs = forward {med['forward']:.0f} + backward {med['backward']:.0f} + optimizer "
          f"{med['optimizer']:.0f} + rest {med['rest']:.0f}\n")
    print("| method | µs per step: total = forward + backward + optimizer + rest (median) | passes per step "
          "(fwd / bwd / opt) | Σ passes / baseline's Σ passes | total / Σ passes, median (min–max) | "
          "baseline's total / Σ passes | total / baseline total | goal | met? |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, runs, bases in rows:
        md = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        over_passes = [r["total"] / r["passes"] for r in runs]
        base_over = [b["total"] / b["passes"] for b in bases]
        pass_units = [r["passes"] / b["passes"] for r, b in zip(runs, bases)]
        vs_base = [r["total"] / b["total"] for r, b in zip(runs, bases)]
        if m in PASS_GOAL:
            goal, ok = f"total/Σ passes ≤ {PASS_GOAL[m]:g}", statistics.median(over_passes) <= PASS_GOAL[m]
        else:
            goal, ok = f"total/baseline ≤ {BASELINE_GOAL:g}", statistics.median(vs_base) <= BASELINE_GOAL
        print(f"| {m} | {md['total']:.0f} = {md['forward']:.0f} + {md['backward']:.0f} + {md['optimizer']:.0f} + "
              f"{md['rest']:.0f} | {md['n_forward']:.2f} / {md['n_backward']:.2f} / {md['n_optimizer']:.2f} | "
              f"{median_range(pass_units)} | {median_range(over_passes)} | {median_range(base_over)} | {median_range(vs_base)} | "
              f"{goal} | {'yes' if ok else 'no'} |", flush=True)
    print(f"\n({time.perf_counter() - t_start:.0f} s; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())})")


if __name__ == "__main__":
    main()
