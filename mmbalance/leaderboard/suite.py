"""Leaderboard suites: ``leaderboard/suites/NAME.toml`` files — datasets × method rows × seeds with a
training budget (an epochs override) and ``--set`` overrides — read and validated into :class:`Suite`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

DEFAULT_SEEDS = 5
SUITE_KEYS = {"name", "description", "seeds", "replicates", "exploratory_replicates", "primary", "epochs", "methods", "exclude", "baseline", "datasets", "sets",
              "method_sets", "variants", "output", "launcher", "num_processes", "accelerate_args", "data_dir",
              "slurm", "retry_failed", "tune", "plugins", "reference"}



# ------------------------------------------------------------------------------------------ suites
SPLITS = ("fixed", "sampled")
DATASET_KEYS = {"sets", "modalities", "split", "split_key", "weak", "replicates"}


@dataclass
class DatasetEntry:
    """One ``[datasets.NAME]`` table. ``split``: ``"fixed"`` (an official or otherwise fixed split, the same for
    every replicate) or ``"sampled"`` (replicate r sets ``split_key`` — default ``dataset.split_seed`` — to r, so
    the split varies with the replicate while rows stay paired by r). ``weak``: the pre-declared weak modality
    (else derived from the baseline's validation Shapley shares, never from test). ``replicates``: this
    dataset's replicates when they differ from the suite's (a dataset with a noisier paired spread needs more to
    reach the same power); None: the suite's."""

    name: str
    sets: dict[str, Any] = field(default_factory=dict)
    modalities: list[str] | None = None
    split: str = "fixed"
    split_key: str = "dataset.split_seed"
    weak: str | None = None
    replicates: list[int] | None = None


@dataclass
class Suite:
    """A parsed suite file. ``methods`` is the raw request ("all" or a list of row names)."""

    name: str
    path: Path
    description: str = ""
    seeds: list[int] = field(default_factory=lambda: list(range(DEFAULT_SEEDS)))  # the replicates r
    primary: list[str] | None = None  # rows of the primary (powered, Holm-tested) family; None: every method row
    #: exploratory rows (not baseline, not primary) run only the first this-many replicates of a dataset; None: all
    exploratory_replicates: int | None = None
    epochs: int | None = None
    methods: str | list[str] = "all"
    exclude: list[str] = field(default_factory=list)
    baseline: str = "baseline"
    datasets: list[DatasetEntry] = field(default_factory=list)
    sets: dict[str, Any] = field(default_factory=dict)
    method_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    output: str | None = None
    launcher: str = "python"
    num_processes: int = 1
    accelerate_args: list[str] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)  # modules or .py files (relative to the suite file)
    tune: Any = None  # TuneConfig of the [tune] table (mmbalance.leaderboard.tune), None without one
    data_dir: str | None = None
    slurm: dict[str, Any] = field(default_factory=dict)
    #: published numbers per dataset (the ``[reference]`` table; :mod:`mmbalance.leaderboard.reference`)
    reference: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def leaderboard_dir(self) -> Path:
        """Where the suite's results (``results/NAME/``) and report (``NAME/``) go by default: the folder that
        holds ``suites/`` for a suite file in a ``suites/`` folder (``leaderboard/`` in a checkout), else the
        folder of the suite file itself (never some unrelated parent folder)."""
        p = self.path.resolve()
        return p.parent.parent if p.parent.name == "suites" else p.parent

    def default_results_dir(self) -> Path:
        return self.leaderboard_dir / "results" / self.name

    def default_out_dir(self) -> Path:
        return (self.leaderboard_dir / (self.output if self.output is not None else self.name)).resolve()

    def replicates_for(self, dataset: str) -> list[int]:
        """The replicates of ``dataset``: its own ``replicates`` where the suite gives them, else the suite's."""
        entry = next((d for d in self.datasets if d.name == dataset), None)
        return list(entry.replicates) if entry is not None and entry.replicates is not None else list(self.seeds)

    def is_powered_row(self, row: str) -> bool:
        """The baseline and the primary family run every replicate; the other rows are exploratory."""
        return row == self.baseline or self.primary is None or row in self.primary

    def row_replicates(self, dataset: str, row: str) -> list[int]:
        """The replicates planned for ``row`` on ``dataset``: all of the dataset's for the baseline and the primary
        family, their first ``exploratory_replicates`` for an exploratory row (a prefix, so it stays paired with
        the baseline by replicate)."""
        reps = self.replicates_for(dataset)
        if self.exploratory_replicates is None or self.is_powered_row(row):
            return reps
        return reps[:self.exploratory_replicates]

    def replicates_text(self) -> str:
        """The planned replicates in words, e.g. ``30 (r = 0–29); avdigits-small: 100 (r = 0–99); exploratory rows:
        the first 20 of their dataset's``."""
        parts = [_count_and_range(self.seeds)]
        parts += [f"{d.name}: {_count_and_range(d.replicates)}" for d in self.datasets if d.replicates is not None]
        if self.exploratory_replicates is not None:
            parts.append(f"exploratory rows: the first {self.exploratory_replicates} of their dataset's")
        return "; ".join(parts)

    def all_replicates(self) -> list[int]:
        """Every replicate any dataset of the suite plans, in first-seen order."""
        return _union_of_replicates(self.seeds, self.datasets)

    def display_path(self) -> str:
        """The suite file as shown in reports (and in their reproduce commands): ``leaderboard/suites/X.toml``
        for a suite in a leaderboard's ``suites/`` folder, else its absolute path (a bare file name would not
        reproduce anything from another directory)."""
        p = self.path.resolve()
        if p.parent.name == "suites":
            return p.relative_to(self.leaderboard_dir.parent).as_posix()
        return p.as_posix()


def find_suite(name_or_path: str | Path) -> Path:
    """``quick`` → ``leaderboard/suites/quick.toml`` (checkout or cwd); a path is used as given."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise ConfigError(f"suite file {str(p)!r} does not exist")
        return p
    candidates = [Path.cwd() / "leaderboard" / "suites" / f"{p}.toml",
                  Path(__file__).resolve().parents[2] / "leaderboard" / "suites" / f"{p}.toml"]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"unknown suite {str(name_or_path)!r}: none of {', '.join(map(str, candidates))} exists; "
                      "give a suite name from leaderboard/suites/ or a path to a .toml file")


def _table(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table (mapping), got {value!r}")
    return dict(value)


def _count_and_range(reps: list[int]) -> str:
    """``30 (r = 0–29)`` for a contiguous run of more than ten, else the list: ``3 (r = 0, 2, 7)``."""
    if len(reps) > 10 and reps == list(range(reps[0], reps[0] + len(reps))):
        return f"{len(reps)} (r = {reps[0]}–{reps[-1]})"
    return f"{len(reps)} (r = {', '.join(map(str, reps))})"


def _replicates(value: Any, where: str) -> list[int]:
    """A replicate count n (replicates 0..n-1) or an explicit list of distinct integers."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = list(range(value))
    if (not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value)
            or len(set(value)) != len(value)):
        raise ConfigError(f"{where} must be a positive count or a list of distinct integers, got {value!r}")
    return value


def _union_of_replicates(seeds: list[int], datasets: list) -> list[int]:
    """The suite's replicates followed by each dataset's own that are not among them yet, in first-seen order."""
    out = list(seeds)
    for d in datasets:
        out += [r for r in (d.replicates or []) if r not in out]
    return out


def load_suite(name_or_path: str | Path) -> Suite:
    """Parse a suite TOML file (schema: leaderboard/suites/quick.toml's header comment)."""
    import tomllib

    path = find_suite(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"suite {str(path)!r} is not valid TOML: {exc}") from None
    where = f"suite {str(path)!r}"
    unknown = sorted(set(raw) - SUITE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(SUITE_KEYS))}")
    if "seeds" in raw and "replicates" in raw:
        raise ConfigError(f"{where}: give 'replicates' or its older name 'seeds', not both")
    seeds = _replicates(raw.get("replicates", raw.get("seeds", DEFAULT_SEEDS)), f"{where}: 'replicates'")
    exploratory = raw.get("exploratory_replicates")
    if exploratory is not None and (not isinstance(exploratory, int) or isinstance(exploratory, bool)
                                    or exploratory < 2):
        raise ConfigError(f"{where}: 'exploratory_replicates' must be an integer >= 2 (a paired interval needs "
                          f"two replicates), got {exploratory!r}")
    datasets_raw = raw.get("datasets")
    if isinstance(datasets_raw, list):
        datasets_raw = {d: {} for d in datasets_raw}
    datasets_raw = _table(datasets_raw, f"{where} 'datasets'")
    if not datasets_raw:
        raise ConfigError(f"{where}: 'datasets' names no dataset")
    datasets = []
    for dname, dval in datasets_raw.items():
        dval = _table(dval, f"{where} datasets.{dname}")
        bad = sorted(set(dval) - DATASET_KEYS)
        if bad:
            raise ConfigError(f"{where} datasets.{dname}: unknown key(s) {', '.join(bad)}; valid: "
                              + ", ".join(sorted(DATASET_KEYS)))
        split = dval.get("split", "fixed")
        if split not in SPLITS:
            raise ConfigError(f"{where} datasets.{dname}.split: expected \"fixed\" or \"sampled\", got {split!r}")
        split_key = str(dval.get("split_key", "dataset.split_seed"))
        dsets = _table(dval.get("sets"), f"{where} datasets.{dname}.sets")
        if split == "sampled" and split_key in dsets:
            raise ConfigError(f"{where} datasets.{dname}: split = \"sampled\" sets {split_key} per replicate; "
                              f"remove {split_key} from its sets")
        weak = dval.get("weak")
        mods = list(dval["modalities"]) if dval.get("modalities") else None
        if weak is not None and mods is not None and weak not in mods:
            raise ConfigError(f"{where} datasets.{dname}.weak: {weak!r} is not one of its modalities {mods}")
        reps = (_replicates(dval["replicates"], f"{where} datasets.{dname}.replicates")
                if "replicates" in dval else None)
        n_reps = len(reps if reps is not None else seeds)
        if exploratory is not None and n_reps < exploratory:
            raise ConfigError(f"{where} datasets.{dname}: {n_reps} replicate(s) is fewer than "
                              f"exploratory_replicates = {exploratory}")
        datasets.append(DatasetEntry(dname, dsets, mods, split, split_key, weak, reps))
    methods = raw.get("methods", "all")
    if not (methods == "all" or (isinstance(methods, list) and methods and all(isinstance(m, str) for m in methods))):
        raise ConfigError(f"{where}: 'methods' must be \"all\" or a non-empty list of names, got {methods!r}")
    variants = {}
    for vname, v in _table(raw.get("variants"), f"{where} 'variants'").items():
        v = _table(v, f"{where} variants.{vname}")
        if "method" not in v:
            raise ConfigError(f"{where} variants.{vname}: needs 'method' (a registered method name)")
        variants[vname] = {"method": v["method"], "sets": _table(v.get("sets"), f"{where} variants.{vname}.sets")}
    launcher = raw.get("launcher", "python")
    if launcher not in ("python", "accelerate"):
        raise ConfigError(f"{where}: 'launcher' must be \"python\" or \"accelerate\", got {launcher!r}")
    epochs = raw.get("epochs")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(f"{where}: 'epochs' must be a positive integer, got {epochs!r}")
    tune = None
    if "tune" in raw:
        from .tune import parse_tune_table

        tune = parse_tune_table(raw["tune"], where, sorted(_union_of_replicates(seeds, datasets)))
    primary = raw.get("primary")
    if primary is not None and not (isinstance(primary, list) and all(isinstance(x, str) for x in primary)):
        raise ConfigError(f"{where}: 'primary' must be a list of row names, got {primary!r}")
    plugins = raw.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(x, str) and x for x in plugins):
        raise ConfigError(f"{where}: 'plugins' must be a list of module names or .py paths, got {plugins!r}")
    plugins = [str((path.parent / x).resolve()) if x.endswith(".py") else x for x in plugins]
    from .reference import parse_reference

    reference = parse_reference(raw.get("reference"), where, [d.name for d in datasets])
    return Suite(
        plugins=plugins, tune=tune, name=str(raw.get("name", path.stem)), path=path, description=str(raw.get("description", "")).strip(),
        seeds=list(seeds), primary=list(primary) if primary is not None else None, exploratory_replicates=exploratory,
        epochs=epochs, methods=methods, exclude=list(raw.get("exclude", [])),
        baseline=str(raw.get("baseline", "baseline")), datasets=datasets,
        sets=_table(raw.get("sets"), f"{where} 'sets'"),
        method_sets={k: _table(v, f"{where} method_sets.{k}")
                     for k, v in _table(raw.get("method_sets"), f"{where} 'method_sets'").items()},
        variants=variants, output=raw.get("output"), launcher=launcher,
        num_processes=int(raw.get("num_processes", 1)), accelerate_args=list(raw.get("accelerate_args", [])),
        data_dir=raw.get("data_dir"), slurm=_table(raw.get("slurm"), f"{where} 'slurm'"), reference=reference)


