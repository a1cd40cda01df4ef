"""Equal-budget hyperparameter tuning on validation: ``python -m mmbalance.leaderboard tune SUITE``.

Protocol (the same for every row — baseline and ``unimodal:<m>`` rows included):

* each row gets ``[tune] trials`` = K trials; trial 0 is the row's defaults, trials k ≥ 1 draw every searched
  value, in sorted name order, from ``RandomState(seed_hash("tune", sampler seed, dataset, row, k))`` — so
  trials are independent of each other, of worker count and finishing order, and raising K keeps the first
  trials (prefix-stable);
* a row's space = its method's hparams space (field metadata, :func:`mmbalance.search.search_space`) ∪ the
  shared training space (lr ×/÷ 4, weight decay ×/÷ 10 around the dataset's defaults), optionally narrowed by
  ``[tune.spaces]`` (never widened);
* one trial = one configuration trained once per tuning seed (disjoint from the report seeds) for the suite's
  epochs, with ``train.evaluate_test=false``: the test split is never evaluated while tuning;
* score = mean over tuning seeds of the oriented validation primary metric of the selected checkpoint;
  a trial replaces the defaults only if it beats them by more than the noise of that mean (:func:`noise_rule`:
  the one-standard-error rule on the seed-paired gain, its error rate kept for the whole row); among trials,
  highest score, ties → more ok seeds → lower mean validation loss → lower k. A failed trial counts against
  the budget and is never chosen. On a dataset whose split is sampled, tuning seed s also uses split seed s.

Trials are ordinary run folders (``RESULTS/_tune/<dataset>/<row>/trial<k>/seed<s>/``) run by the same
executor as report runs, so they skip when done, resume when killed and run on SLURM alike.
``<row>/tune.json`` records the space, every trial and the choice, with no timestamps (same inputs → same
bytes).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import config_hash
from ..errors import ConfigError
from ..runfiles import atomic_write_json
from ..search import (
    Choice,
    Distribution,
    IntUniform,
    distribution_from_json,
    method_search_space,
    seed_hash,
    space_hash,
    space_to_json,
    training_space,
)
from .plan import RunSpec, RunState, format_set_value, plan_hash_payload, read_state, safe_name
from .suite import Suite

TUNE_DIR = "_tune"
TUNE_FILE = "tune.json"
TRIAL_FILE = "trial.json"
TUNE_VERSION = 2  # 2: the one-SE rule (``rule``) decides whether a trial replaces the defaults
NO_TEST = ("train.evaluate_test", "false")
#: What every trial adds to its row's sets: no test evaluation (enforced), and no work a trial's score does not
#: use — the imbalance diagnostics and the per-modality evaluation (neither changes training: same selected
#: checkpoint and validation metric; tested), which roughly halve a short trial's cost.
TRIAL_SETS = (NO_TEST, ("train.diagnostics", "none"), ("train.modality_eval", "none"))


@dataclass
class TuneConfig:
    """A suite's ``[tune]`` table."""

    trials: int = 8
    seeds: list[int] = field(default_factory=lambda: [1000])
    sampler: str = "random"
    seed: int = 0
    spaces: dict[str, dict[str, Any]] = field(default_factory=dict)


TUNE_KEYS = {"trials", "seeds", "sampler", "seed", "spaces"}


def parse_tune_table(raw: Any, where: str, report_seeds: list[int]) -> TuneConfig:
    """Validate a suite's ``[tune]`` table (``where`` names the suite file in messages)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} 'tune': expected a table, got {raw!r}")
    unknown = sorted(set(raw) - TUNE_KEYS)
    if unknown:
        raise ConfigError(f"{where} 'tune': unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(TUNE_KEYS))}")
    trials = raw.get("trials", 8)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"{where} tune.trials: expected a positive integer, got {trials!r}")
    seeds = raw.get("seeds", [1000])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{where} tune.seeds: expected a non-empty list of integers, got {seeds!r}")
    overlap = sorted(set(seeds) & set(report_seeds))
    if overlap:
        raise ConfigError(f"{where} tune.seeds: {overlap} are also report seeds; tuning seeds must be disjoint "
                          "from 'seeds' so the reported runs never influenced the chosen configuration")
    sampler = raw.get("sampler", "random")
    if sampler != "random":
        raise ConfigError(f"{where} tune.sampler: {sampler!r} is not available; valid: 'random'")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{where} tune.seed: expected an integer, got {seed!r}")
    spaces = raw.get("spaces", {})
    if not isinstance(spaces, dict) or not all(isinstance(v, dict) for v in spaces.values()):
        raise ConfigError(f"{where} tune.spaces: expected ROW = {{field = [kind, lo, hi]}} tables, got {spaces!r}")
    return TuneConfig(trials=trials, seeds=list(seeds), sampler=sampler, seed=seed,
                      spaces={row: dict(v) for row, v in spaces.items()})


# ------------------------------------------------------------------------------------------ spaces
def _narrow(declared: Distribution, given: Distribution, where: str) -> Distribution:
    """``given`` must lie inside ``declared`` (a spec may narrow a space, never widen it)."""
    if isinstance(declared, Choice) or isinstance(given, Choice):
        vals = given.values if isinstance(given, Choice) else None
        if vals is None or not all(declared.contains(v) for v in vals):
            raise ConfigError(f"{where}: {given.to_json()} is not inside the declared space {declared.to_json()}")
        return given
    if type(given) is not type(declared) or given.lo < declared.lo or given.hi > declared.hi:
        raise ConfigError(f"{where}: {given.to_json()} is not inside the declared space {declared.to_json()} "
                          "(a suite may narrow a space, never widen it)")
    return given


def dataset_train_defaults(dataset: str, sets: dict[str, str], data_dir: str | None) -> tuple[float, float]:
    """The dataset's default lr and weight decay (the centre of the shared training space)."""
    from ..config import TrainConfig, parse_set_items
    from ..registry import create_dataset

    ds_opts = parse_set_items([f"{k}={v}" for k, v in sets.items() if k.startswith("dataset.")])["dataset"]
    data = create_dataset(dataset, data_dir, **ds_opts)
    defaults = {**{"lr": TrainConfig.lr, "weight_decay": TrainConfig.weight_decay}, **data.train_defaults}
    return float(defaults["lr"]), float(defaults["weight_decay"])


def row_space(method: str, row: str, lr: float, weight_decay: float, tune: TuneConfig,
              fixed: dict[str, str], where: str) -> dict[str, Distribution]:
    """The searched values of one row: ``train.*`` keys and the method's hyperparameter names."""
    space: dict[str, Distribution] = dict(training_space(lr, weight_decay))
    space.update(method_search_space(method))
    narrowing = tune.spaces.get(row, {})
    for key, raw in narrowing.items():
        if key not in space:
            raise ConfigError(f"{where} tune.spaces.{row}: unknown field {key!r}; searchable fields of row "
                              f"{row!r}: {', '.join(sorted(space)) or '(none)'}")
        space[key] = _narrow(space[key], distribution_from_json(raw, f"{where} tune.spaces.{row}.{key}"),
                             f"{where} tune.spaces.{row}.{key}")
    both = sorted(set(space) & set(fixed))
    if both:
        raise ConfigError(f"{where}: row {row!r} fixes {', '.join(both)} in its --set values but tuning searches "
                          "them; remove the fixed value or the search")
    if "train.evaluate_test" in fixed and fixed["train.evaluate_test"] not in ("false", "False", "no"):
        raise ConfigError(f"{where}: tuning trials never evaluate the test split; remove train.evaluate_test")
    return space


def sample_trial(space: dict[str, Distribution], tune: TuneConfig, dataset: str, row: str, k: int) -> dict[str, Any]:
    """Trial ``k``'s values: {} for k = 0 (the defaults), else one draw per field in sorted name order."""
    import numpy as np

    if k == 0:
        return {}
    rs = np.random.RandomState(seed_hash("tune", tune.seed, dataset, row, k))
    return {name: space[name].sample(rs) for name in sorted(space)}


def _set_value(dist: Distribution, v: Any) -> str:
    if isinstance(dist, IntUniform):
        return str(int(v))
    return format_set_value(v)


# ------------------------------------------------------------------------------------------ planning
@dataclass
class RowTune:
    """The tuning plan of one (dataset, row): its space, trials and their runs."""

    dataset: str
    row: str
    method: str
    base_sets: tuple[tuple[str, str], ...]
    space: dict[str, Distribution]
    trials: list[dict[str, Any]]  # [{k, params, sets}]
    specs: dict[int, list[RunSpec]]  # k -> one spec per tuning seed
    dir: Path

    @property
    def all_specs(self) -> list[RunSpec]:
        return [s for k in sorted(self.specs) for s in self.specs[k]]


def plan_tuning(suite: Suite, report_specs: list[RunSpec], results_dir: str | Path, *,
                data_dir: str | None = None, trials: int | None = None) -> list[RowTune]:
    """One :class:`RowTune` per (dataset, row) of the report plan (n/a rows are planned too: their first trial
    finds out and the rest are skipped by the executor)."""
    tune: TuneConfig | None = getattr(suite, "tune", None)
    if tune is None:
        raise ConfigError(f"suite {suite.name!r} has no [tune] table")
    k_max = trials if trials is not None else tune.trials
    where = f"suite {str(suite.path)!r}"
    results_dir = Path(results_dir).resolve()
    centres: dict[str, tuple[float, float]] = {}
    rows: dict[tuple[str, str], RunSpec] = {}
    for s in report_specs:
        rows.setdefault((s.dataset, s.row), s)
    entries = {e.name: e for e in suite.datasets}
    out: list[RowTune] = []
    for (dataset, row), template in rows.items():
        fixed = dict(template.sets)
        if dataset not in centres:
            centres[dataset] = dataset_train_defaults(dataset, fixed, data_dir or suite.data_dir)
        space = row_space(template.method, row, *centres[dataset], tune, fixed, where)
        sh = space_hash(space)
        row_dir = results_dir / TUNE_DIR / dataset / safe_name(row)
        trial_rows, specs = [], {}
        for k in range(k_max):
            params = sample_trial(space, tune, dataset, row, k)
            sets = tuple((name, _set_value(space[name], v)) for name, v in sorted(params.items()))
            trial_rows.append({"k": k, "params": params, "sets": [list(x) for x in sets]})
            specs[k] = []
            for seed in tune.seeds:
                spec = dataclasses.replace(template, seed=seed, sets=_tuning_split(template.sets, entries.get(dataset),
                                                                                  seed) + sets + TRIAL_SETS,
                                           plan_hash="", run_dir="")
                h = config_hash({**plan_hash_payload(spec), "space_hash": sh})
                specs[k].append(dataclasses.replace(spec, plan_hash=h,
                                                    run_dir=str(row_dir / f"trial{k}" / f"seed{seed}")))
        out.append(RowTune(dataset, row, template.method, template.sets, space, trial_rows, specs, row_dir))
    return out


def _tuning_split(sets: tuple[tuple[str, str], ...], entry: Any, seed: int) -> tuple[tuple[str, str], ...]:
    """A dataset whose split is sampled per replicate is tuned on the splits of the tuning seeds (split seed s for
    tuning seed s), never on a report replicate's split."""
    if entry is None or getattr(entry, "split", "fixed") != "sampled":
        return sets
    return tuple((k, str(seed) if k == entry.split_key else v) for k, v in sets)


def write_trial_files(plans: list[RowTune], tune: TuneConfig) -> None:
    for p in plans:
        sh = space_hash(p.space)
        for t in p.trials:
            atomic_write_json(p.dir / f"trial{t['k']}" / TRIAL_FILE,
                              {"k": t["k"], "sampler": tune.sampler, "params": t["params"], "sets": t["sets"],
                               "space_hash": sh})


# ------------------------------------------------------------------------------------------ selection
def oriented_val(result: dict[str, Any]) -> float:
    """The validation primary metric of the selected checkpoint, oriented so that higher is better."""
    key = result["primary_metric"]
    v = float(result["val"][key])
    return v if result.get("higher_is_better", True) else -v


def score_trial(states: list[RunState]) -> dict[str, Any]:
    """A trial's state (ok only when every tuning seed is ok), per-seed validation values and score."""
    if any(s.state == "n/a" for s in states):
        return {"state": "n/a", "val_per_seed": {}, "score": None, "val_loss": None, "ok_seeds": 0,
                "error": next(s.error for s in states if s.state == "n/a")}
    vals = {str(s.spec.seed): oriented_val(s.result) for s in states if s.state == "ok" and s.result}
    losses = [float(s.result["val"].get("loss", math.inf)) for s in states if s.state == "ok" and s.result]
    all_ok = len(vals) == len(states) and all(math.isfinite(v) for v in vals.values())
    score = sum(vals.values()) / len(vals) if all_ok else None
    state = "ok" if all_ok else ("failed" if any(s.state == "failed" for s in states) else "pending")
    return {"state": state, "val_per_seed": vals, "score": score, "ok_seeds": len(vals),
            "val_loss": sum(losses) / len(losses) if losses else None,
            "error": next((s.error for s in states if s.state == "failed"), "")}


#: The one-standard-error level: a single comparison "gain > 1 SE" errs with probability 1 − Φ(1) ≈ 0.159
#: under no effect; :func:`choose` keeps that error rate for the whole row by splitting it over the K − 1
#: candidates (Bonferroni), i.e. the gain must exceed Φ⁻¹(1 − 0.159 / (K − 1)) standard errors.
ONE_SE_ERROR = 0.15865525393145707


def _best(ok: list[dict[str, Any]]) -> dict[str, Any]:
    return min(ok, key=lambda t: (-t["score"], -t["ok_seeds"],
                                  t["val_loss"] if t["val_loss"] is not None else math.inf, t["k"]))


#: the rule's name when trial 0 (the defaults) failed on a tuning seed and the best ok trial is chosen
DEFAULTS_FAILED_RULE = "defaults failed: best ok trial"


def noise_rule(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The one-SE rule's numbers for the best trial b ≠ 0 against the defaults (trial 0), paired by tuning seed:
    gain = mean_s (v_b,s − v_0,s); se = σ̂ / √n_b with σ̂² the variance of the paired differences d_k,s = v_k,s −
    v_0,s around their trial means, pooled over every ok trial k ≥ 1 (Σ(d − d̄_k)² / Σ(n_k − 1): one noise level
    per row, stable with 3 seeds); threshold = Φ⁻¹(1 − ONE_SE_ERROR / (K − 1)) · se with K − 1 the number of ok
    candidates. ``replace`` is gain > threshold (with se = 0: gain > 0). Needs ≥ 2 tuning seeds; with one, no
    noise can be estimated and only a strictly higher score replaces the defaults (``rule`` says which)."""
    from scipy.stats import norm

    ok = {t["k"]: t for t in trials if t["state"] == "ok" and t["score"] is not None}
    base = ok.get(0)
    cands = [t for k, t in ok.items() if k != 0]
    if not cands:
        return {"rule": "no candidate", "replace": False}
    best = _best(cands)
    if base is None:  # the defaults failed on a tuning seed: nothing to beat, the best ok trial replaces them
        return {"rule": DEFAULTS_FAILED_RULE, "replace": True, "k": best["k"]}
    v0 = {s: float(v) for s, v in (base.get("val_per_seed") or {}).items()}
    diffs = {t["k"]: [float(v) - v0[s] for s, v in (t.get("val_per_seed") or {}).items() if s in v0] for t in cands}
    if len(v0) < 2 or len(diffs[best["k"]]) < 2:
        return {"rule": "higher score (one tuning seed: no noise estimate)", "gain": best["score"] - base["score"],
                "replace": best["score"] > base["score"], "k": best["k"]}
    ss = sum(sum((x - sum(d) / len(d)) ** 2 for x in d) for d in diffs.values() if len(d) >= 2)
    dof = sum(len(d) - 1 for d in diffs.values() if len(d) >= 2)
    sigma = math.sqrt(ss / dof) if dof else 0.0
    d_b = diffs[best["k"]]
    gain = sum(d_b) / len(d_b)
    se = sigma / math.sqrt(len(d_b))
    z = float(norm.ppf(1.0 - ONE_SE_ERROR / len(cands)))
    return {"rule": f"one-SE (gain > {z:.3f} pooled SE; {len(cands)} candidates)", "gain": gain, "se": se,
            "threshold": z * se, "replace": gain > z * se if se > 0 else gain > 0, "k": best["k"]}


def choose(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The chosen trial: the defaults (trial 0) unless the best other trial (highest score; ties → more ok seeds
    → lower validation loss → lower k) beats them by more than the noise of the mean (:func:`noise_rule`); a tie
    always keeps the defaults. Failed, pending and n/a trials are never chosen; if the defaults failed, the best
    ok trial; None when no trial is ok."""
    ok = [t for t in trials if t["state"] == "ok" and t["score"] is not None]
    if not ok:
        return None
    base = next((t for t in ok if t["k"] == 0), None)
    if base is None:
        return _best(ok)
    rule = noise_rule(trials)
    if rule.get("replace"):
        return next(t for t in ok if t["k"] == rule["k"])
    return base


def aggregate(plan: RowTune, tune: TuneConfig, epochs: int | None) -> dict[str, Any]:
    """Score every trial of one row, choose, and write ``tune.json`` (atomically, no timestamps)."""
    trials = []
    for t in plan.trials:
        sc = score_trial([read_state(s) for s in plan.specs[t["k"]]])
        trials.append({"k": t["k"], "params": t["params"], "sets": t["sets"], **sc})
    chosen = choose(trials)
    states = {t["state"] for t in trials}
    row_state = ("n/a" if "n/a" in states else "ok" if chosen and states == {"ok"}
                 else "pending" if "pending" in states else "failed" if chosen is None else "ok")
    payload = {
        "version": TUNE_VERSION, "dataset": plan.dataset, "row": plan.row, "method": plan.method,
        "space": space_to_json(plan.space), "space_hash": space_hash(plan.space), "sampler": tune.sampler,
        "sampler_seed": tune.seed, "trials_planned": len(plan.trials), "tune_seeds": list(tune.seeds),
        "epochs": epochs, "state": row_state,
        "trials": [{k: t[k] for k in ("k", "params", "state", "val_per_seed", "score")} for t in trials],
        "trials_ok": sum(t["state"] == "ok" for t in trials),
        "chosen": ({"k": chosen["k"], "params": chosen["params"], "sets": chosen["sets"], "score": chosen["score"]}
                   if chosen else None),
        "rule": noise_rule(trials),
        "default_score": trials[0]["score"] if trials else None,
    }
    atomic_write_json(plan.dir / TUNE_FILE, payload)
    return payload


def read_tune(results_dir: str | Path, dataset: str, row: str) -> dict[str, Any] | None:
    from ..runfiles import read_json

    path = Path(results_dir).resolve() / TUNE_DIR / dataset / safe_name(row) / TUNE_FILE
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def apply_choices(suite: Suite, report_specs: list[RunSpec], results_dir: str | Path, *,
                  untuned: bool = False) -> list[RunSpec]:
    """Report runs with each row's chosen values added to its --set values. The plan hash covers them, so
    a re-tune re-plans the report. Rows whose tuning is incomplete stop the plan (ConfigError listing them)
    unless ``untuned`` (then they keep their defaults and the report flags them)."""
    from .plan import with_sets

    out, missing = [], []
    results_dir = Path(results_dir).resolve()
    for s in report_specs:
        info = read_tune(results_dir, s.dataset, s.row)
        if info is None or info.get("state") == "pending" or (info.get("chosen") is None and info.get("state") != "n/a"):
            missing.append(f"{s.dataset}/{s.row}")
            out.append(s)
            continue
        chosen = info.get("chosen")
        extra = tuple(tuple(x) for x in chosen["sets"]) if chosen else ()
        out.append(with_sets(s, s.sets + extra, results_dir))
    missing = sorted(set(missing))
    if missing and not untuned:
        raise ConfigError(f"suite {suite.name!r}: tuning is incomplete for {len(missing)} row(s): "
                          + ", ".join(missing[:12]) + (" …" if len(missing) > 12 else "")
                          + f"; run `python -m mmbalance.leaderboard tune {suite.name}` first, or pass --untuned")
    return out
