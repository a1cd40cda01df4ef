"""Command line: ``python -m mmbalance.run`` / ``accelerate launch -m mmbalance.run``.

Configuration precedence: dataset preset ◄ method (preset) defaults ◄ ``--config`` file ◄ CLI flags
(``--set`` included). Exit codes: 0 ok, 2 bad input (nothing written; also a run folder that is in use, or that holds a
finished result and neither ``--resume`` nor ``--overwrite`` is given), 3 run failed (non-finite loss
or evaluation; ``result.json`` says ``failed``), 4 a run file could not be written (full disk, no
permission; the previous files are intact), 128 + N stopped by signal N at a safe point (130 Ctrl-C,
143 SIGTERM; ``result.json`` says ``interrupted``, continue with ``--resume``).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

from .config import RunConfig, TrainConfig, build_hparams, load_config_file, parse_set_items
from .errors import (
    ConfigError,
    MethodNotApplicable,
    MMBalanceError,
    NonFiniteLossError,
    RunFileWriteError,
    RunInterrupted,
)

DATA_ENV = "MMBALANCE_DATA"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmbalance.run",
        description="Train one balancing method on one dataset with one seed; writes config.json, "
                    "metrics.jsonl and result.json to the run directory.",
        epilog="Examples:\n  python -m mmbalance.run --method baseline --dataset mfeat\n"
               "  python -m mmbalance.run --method unimodal:fac --dataset mfeat --seed 1\n"
               "  python -m mmbalance.run --method cggm --dataset mfeat-hard --set rho=1.3 --set train.epochs=20\n"
               "  accelerate launch -m mmbalance.run --method cggm --dataset food101 --data-dir /data",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", help="registered method name (default: baseline); see --list")
    p.add_argument("--dataset", help="registered dataset name (default: mfeat); see --list")
    p.add_argument("--seed", type=int, help="training seed (default 0); the split seed is a dataset option")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"])
    p.add_argument("--output-dir", help="parent folder of run directories and shared artefacts such as teacher "
                                       "caches (default: runs/, or the parent of --run-dir when that is given)")
    p.add_argument("--run-dir", help="exact run directory (default: OUTPUT_DIR/DATASET/METHOD/seedSEED-HASH, "
                                    "HASH = the first 8 hex digits of the config hash)")
    p.add_argument("--data-dir", help=f"root folder of on-disk datasets (default: ${DATA_ENV})")
    p.add_argument("--config", help="YAML or TOML file with train/method/dataset/model sections")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a method hyperparameter (NAME) or dataset.NAME, model.NAME, train.NAME")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished or unfinished run in RUN_DIR (a finished result is kept in "
                        "RUN_DIR/previous/ until the new run finishes)")
    p.add_argument("--skip-finished", action="store_true",
                   help="with --overwrite: keep a finished result of these very settings run with as many "
                        "processes (same config hash and world_size; nothing to do, exit 0) and replace any other "
                        "(what sweeps use)")
    p.add_argument("--list", action="store_true", help="list methods and datasets and exit")
    p.add_argument("--show-space", action="store_true",
                   help="print the tuning search space of --method (and the shared training space) and exit")
    p.add_argument("--quiet", action="store_true", help="no progress output (the final result line stays)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import a module or .py file that registers methods/datasets (repeatable; also "
                        "$MMBALANCE_PLUGINS and the 'mmbalance.methods' entry-point group)")
    p.add_argument("--log-with", action="append", default=[], metavar="TRACKER",
                   help="also log per-epoch values to an Accelerate tracker: tensorboard, wandb, mlflow, ... "
                        "(repeatable; files under RUN_DIR/trackers/)")
    p.add_argument("--print-config", action="store_true",
                   help="print the fully resolved configuration (JSON) and exit; nothing is written")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve, build the model and the method, print the configuration and parameter "
                        "counts, and exit without training; nothing is written")
    return p


def _hparams_text(cls: Any, bound: dict[str, Any]) -> str:
    import dataclasses

    if cls is None or not dataclasses.is_dataclass(cls):
        return ""
    vals = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = bound.get(f.name, f.default if f.default is not dataclasses.MISSING else
                            (f.default_factory() if f.default_factory is not dataclasses.MISSING else "?"))
        vals.append(f"{f.name}={default}")
    return ", ".join(vals)


def print_listing() -> int:
    """``--list``: methods (supported tasks and hyperparameters with their defaults), datasets, and any
    module that failed to import (shown as broken with its error; exit code 1 then)."""
    from .registry import DATASETS, METHODS

    print("methods:")
    for name, desc in METHODS.describe().items():
        entry = METHODS.get(name)
        cls = entry.factory
        tasks = ", ".join(sorted(getattr(cls, "supported_tasks", ())))
        print(f"  {name:<28} {desc}")
        print(f"  {'':<28}   tasks: {tasks}")
        hp = _hparams_text(getattr(cls, "hparams_cls", None), entry.defaults)
        if hp:
            print(f"  {'':<28}   hyperparameters: {hp}")
    print("datasets:")
    for name, desc in DATASETS.describe().items():
        print(f"  {name:<28} {desc}")
    broken = {**{f"method module {k}": v for k, v in METHODS.broken.items()},
              **{f"dataset module {k}": v for k, v in DATASETS.broken.items()}}
    if broken:
        print("broken (failed to import; their names cannot be used):")
        for what, err in broken.items():
            print(f"  {what}: {err}")
    return 1 if broken else 0


def print_space(method: str) -> None:
    """``--show-space``: the method's searched hyperparameters (field metadata on its hparams dataclass) and
    the training space every row shares (relative to the dataset's defaults)."""
    from .search import method_search_space

    space = method_search_space(method)
    print(f"tuning space of {method!r} (python -m mmbalance.leaderboard tune; trial 0 = the defaults):")
    for name, dist in sorted(space.items()):
        print(f"  {name:<22} {dist.to_json()}")
    if not space:
        print("  (no method hyperparameter is searched)")
    print("  train.lr               ['log', lr0/4, 4*lr0]      (lr0 = the dataset's default)")
    print("  train.weight_decay     ['log', wd0/10, 10*wd0]    (fixed when the dataset's default is 0)")


def _file_and_sets(args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    file_cfg: dict[str, dict[str, Any]] = {"train": {}, "method": {}, "dataset": {}, "model": {}, "top": {}}
    if args.config:
        file_cfg = load_config_file(args.config)
    return file_cfg, parse_set_items(args.set)


def dataset_request(args: argparse.Namespace, file_cfg: dict[str, dict[str, Any]] | None = None,
                    sets: dict[str, dict[str, Any]] | None = None) -> tuple[str, str | None, dict[str, Any]]:
    """(dataset name, data folder, dataset options) of a parsed command line, as :func:`resolve` loads it."""
    if file_cfg is None or sets is None:
        file_cfg, sets = _file_and_sets(args)
    top = file_cfg["top"]
    name = args.dataset or top.get("dataset_name") or "mfeat"
    data_dir = args.data_dir or top.get("data_dir") or os.environ.get(DATA_ENV)
    return name, data_dir, {**file_cfg["dataset"], **sets["dataset"]}


def resolve(args: argparse.Namespace):
    """Resolve everything (no file written): returns (RunConfig, TrainConfig, data, method, run_dir)."""
    from .registry import create_dataset, method_entry

    file_cfg, sets = _file_and_sets(args)
    top = file_cfg["top"]
    method_name = args.method or top.get("method_name") or "baseline"
    seed = args.seed if args.seed is not None else _config_seed(top.get("seed", 0), args.config)
    entry = method_entry(method_name)  # unknown method → error listing the known ones, before loading data
    dataset_name, data_dir, dataset_options = dataset_request(args, file_cfg, sets)
    data = create_dataset(dataset_name, data_dir, **dataset_options)

    train_values = {**data.train_defaults, **file_cfg["train"], **sets["train"]}
    for flag, key in (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr"),
                      ("mixed_precision", "mixed_precision")):
        if getattr(args, flag) is not None:
            train_values[key] = getattr(args, flag)
    train_cfg = build_hparams(TrainConfig, train_values, where="training settings")

    base = method_name.split(":", 1)[0]
    cls = entry.factory
    method_values = {**data.method_defaults.get(cls.name, {}), **data.method_defaults.get(base, {}),
                     **entry.defaults, **file_cfg["method"], **sets["method"]}
    hp = build_hparams(cls.hparams_cls, method_values, where=f"method {method_name!r}")
    method = cls(hp)
    method.registered_name = method_name
    run_dir = Path(args.run_dir) if args.run_dir else None
    # shared artefacts (unimodal teacher caches: OUTPUT_DIR/_teachers) stay next to an explicit --run-dir,
    # not in ./runs of whatever the current directory is
    output_dir = args.output_dir or top.get("output_dir") or (str(run_dir.parent) if run_dir is not None else "runs")
    config = RunConfig(method=method_name, dataset=dataset_name, seed=seed, train={}, method_options=method_values,
                       dataset_options=dataset_options, model={**file_cfg["model"], **sets["model"]},
                       output_dir=str(output_dir), run_dir=str(run_dir), data_dir=str(data_dir) if data_dir else None)
    from .config import hashed_train_settings

    config.train = hashed_train_settings(train_cfg)
    if run_dir is None:  # named after the settings, so that other settings never share it
        from .runfolder import default_run_dir

        run_dir = default_run_dir(output_dir, config)
        config.run_dir = str(run_dir)
    return config, train_cfg, data, method, run_dir


def _config_seed(value: Any, path: str | None) -> int:
    """``seed`` from a config file: a non-negative integer (``abc`` and ``1.7`` are refused, not coerced)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"config file {str(path)!r}: key 'seed': expected a non-negative integer, got {value!r}")
    return value


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, resolve and train; returns result.json's content. Raises on error."""
    args = build_parser().parse_args(argv)
    if args.plugin:
        from .errors import RegistryError
        from .registry import load_plugins

        try:
            load_plugins(args.plugin)
        except RegistryError:
            if not args.list:  # --list shows the broken plug-in with its error instead (exit 1)
                raise
    if args.list:
        code = print_listing()
        return {"_exit_code": code} if code else {}
    if args.show_space:
        print_space(args.method or "baseline")
        return {}
    if args.seed is not None and args.seed < 0:
        raise ConfigError(f"--seed {args.seed}: expected a non-negative integer")
    if args.log_with:
        from .trackers import TRACKERS

        bad = [t for t in args.log_with if t not in TRACKERS and t != "all"]
        if bad:
            raise ConfigError(f"--log-with {', '.join(bad)}: unknown tracker; valid: {', '.join(TRACKERS)}, all")
    config, train_cfg, data, method, run_dir = resolve(args)
    _check_run_dir(Path(run_dir))
    if args.print_config and not args.dry_run:
        print(json.dumps(resolved_config(config, train_cfg, method), indent=2, sort_keys=True, default=str))
        return {}
    if args.dry_run:
        from .engine import Trainer

        trainer = Trainer(config, train_cfg, data, method, run_dir, resume=args.resume, quiet=args.quiet,
                          log_with=args.log_with)
        print(json.dumps({**resolved_config(config, train_cfg, method), "parameters": trainer._parameter_counts(),
                          "num_train_samples": len(trainer.train_split)}, indent=2, sort_keys=True, default=str))
        return {}
    result, is_main = _run_in_folder(args, config, train_cfg, data, method, run_dir)
    if is_main:
        print(result_line(config, result, run_dir))
    return result


def result_line(config: RunConfig, result: dict[str, Any], run_dir: Path) -> str:
    """The final line of a run (printed with --quiet too)."""
    key = result["primary_metric"]
    if result["test"] is None:
        test_text = "test not evaluated (train.evaluate_test=false)"
    else:
        test_text = f"test {key} {result['test'][key]:.4f}"
        if result.get("test_per_modality"):  # unimodal runs have none
            test_text += f"; per-modality test {key}: " + ", ".join(
                f"{m} {r[key]:.4f}" for m, r in result["test_per_modality"].items())
    return (f"{config.method} on {config.dataset} (seed {config.seed}): val {key} {result['val'][key]:.4f}, "
            f"{test_text}\nrun files: {run_dir}")


def resolved_config(config: RunConfig, train_cfg: TrainConfig, method: Any) -> dict[str, Any]:
    from .config import to_jsonable

    return {**to_jsonable(config), "train": to_jsonable(train_cfg), "method_hparams": to_jsonable(method.hp)}


def _check_run_dir(run_dir: Path) -> None:
    """The run directory and its parents must be folders (or not exist yet)."""
    for p in (run_dir, *run_dir.parents):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"run directory {str(run_dir)!r}: {str(p)!r} exists and is not a folder; "
                              "choose another --output-dir/--run-dir")


def _say(message: str) -> None:
    """Errors are printed once, by rank 0 (every rank of a distributed run parses and fails alike)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


def _created_parents(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet (removed again if the run writes nothing)."""
    out = []
    p = path.absolute()
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def _interrupted_record(run_dir: Path, config: RunConfig, signum: int, message: str) -> dict[str, Any]:
    """``result.json`` of a run stopped by a signal outside the engine's own safe point (before the first
    epoch, a second signal, or the moment the first signal arrives): resumable from the last checkpoint."""
    import signal

    from . import runfiles, runfolder

    try:
        epochs = len((run_dir / runfiles.METRICS_FILE).read_text().splitlines())
    except OSError:
        epochs = 0
    return {"status": "interrupted", "resumable": True, "signal": signal.Signals(signum).name, "message": message,
            "epochs_done": epochs, "config_hash": runfolder.identity_hash(config), "method": config.method,
            "dataset": config.dataset, "seed": config.seed}


def _mark_interrupted(run_dir: Path, config: RunConfig, signum: int, message: str, *, provisional: bool) -> None:
    """Record the run as interrupted. ``provisional`` (the moment the first signal arrives): replaces no
    result but an older interrupted record; the engine's own record at its safe point replaces it. Otherwise
    (stopped outside the safe point): replaces nothing but a provisional record."""
    from . import runfiles, runfolder

    res, _ = runfolder._read_json(run_dir / runfiles.RESULT_FILE)
    res = res if isinstance(res, dict) else None
    if res is None or (res.get("provisional") if not provisional else res.get("status") == "interrupted"):
        record = _interrupted_record(run_dir, config, signum, message)
        runfiles.atomic_write_json(run_dir / runfiles.RESULT_FILE, {**record, "provisional": True} if provisional
                                   else record)


def _record_setup_crash(run_dir: Path, config: RunConfig, exc: BaseException) -> None:
    """A crash before training started (a method's ``setup``, the model, the engine's set-up): the same
    failed ``result.json`` with the traceback as a crash during training."""
    import traceback

    from . import runfiles, runfolder

    runfiles.atomic_write_json(run_dir / runfiles.RESULT_FILE, {
        "status": "failed", "error": f"{type(exc).__name__}: {exc}", "stage": "set-up",
        "traceback": "".join(traceback.format_exception(exc)), "method": config.method, "dataset": config.dataset,
        "seed": config.seed, "config_hash": runfolder.identity_hash(config), "versions": runfiles.package_versions(),
        "code": runfiles.code_provenance()})


def _run_in_folder(args: argparse.Namespace, config: RunConfig, train_cfg: TrainConfig, data: Any, method: Any,
                   run_dir: Path) -> tuple[dict[str, Any], bool]:
    """Train under the run folder's lock (one writer per folder) after :func:`runfolder.prepare` said the
    folder may be used; SIGTERM/SIGINT stop at the next epoch checkpoint. Returns (result, is_main).
    A stop signal that arrives after the last epoch lets the run finish (its result is complete) and is
    then raised as :class:`RunInterrupted`, so the exit code still says the process was signalled."""
    from . import preempt, runfiles, runfolder
    from .engine import Trainer
    from .locks import folder_lock

    is_main = int(os.environ.get("RANK", "0")) == 0  # before the Accelerator exists; torchrun sets RANK
    world = int(os.environ.get("WORLD_SIZE", "1"))  # the process count this run will have (launchers set it)
    created = _created_parents(run_dir)
    try:
        with folder_lock(run_dir, take=is_main):
            if is_main:
                runfolder.recover_set_aside(run_dir)
                runfolder.clean_temp_files(run_dir)
                action = runfolder.prepare(run_dir, config, resume=args.resume, overwrite=args.overwrite,
                                           skip_finished=getattr(args, "skip_finished", False), world_size=world)
            else:  # the main rank decides and acts; the others only need to know whether to train
                state = runfolder.inspect(run_dir, runfolder.identity_hash(config))
                finished = (state.kind == "finished" and args.resume) or (
                    getattr(args, "skip_finished", False) and runfolder.keeps_finished(state, world))
                action = "finished" if finished else ("resume" if args.resume else "fresh")
            if action == "finished":
                result = runfiles.read_json(run_dir / runfiles.RESULT_FILE)
                if is_main:
                    print(f"{run_dir} has already finished with these settings; nothing to do (its result is "
                          "unchanged)", file=sys.stderr)
                return result, is_main

            def on_first(signum: int) -> None:  # recorded at once: a launcher may SIGKILL before the epoch ends
                if is_main:
                    _mark_interrupted(run_dir, config, signum, "stopping at the end of the current epoch after "
                                      f"{__import__('signal').Signals(signum).name}; if the process was killed before "
                                      "that, --resume continues from the last epoch checkpoint", provisional=True)

            late = None
            with preempt.handling(on_first):
                try:
                    try:
                        trainer = Trainer(config, train_cfg, data, method, run_dir, resume=args.resume,
                                          quiet=args.quiet, log_with=args.log_with)
                    except (MMBalanceError, KeyboardInterrupt, RunInterrupted):
                        raise
                    except Exception as exc:  # a crash in a method's setup() or the model: a failed record
                        if is_main:
                            _record_setup_crash(run_dir, config, exc)
                        raise
                    try:
                        result = trainer.fit()
                    except (MMBalanceError, KeyboardInterrupt, RunInterrupted):
                        raise
                    except Exception as exc:  # a crash inside a method or the engine: leave a failed record
                        trainer.record_crash(exc)
                        raise
                    late = preempt.requested()
                except RunInterrupted as exc:  # stopped before the engine's safe point: say so
                    if is_main:
                        _mark_interrupted(run_dir, config, exc.signum, str(exc), provisional=False)
                    raise
            if is_main and result.get("status") == "ok":
                runfolder.drop_previous(run_dir)
            if late:
                import signal

                if is_main:
                    print(result_line(config, result, run_dir))
                raise RunInterrupted(late, f"received {signal.Signals(late).name} after the last epoch; the run "
                                           "had finished: its result is complete (result.json says ok)")
            return result, is_main
    except BaseException:
        if is_main:  # a run refused before writing anything leaves no folder behind
            for p in created:
                try:
                    p.rmdir()
                except OSError:
                    break
        raise


#: errno values of a file-system that refuses writes (exit code 4, like a run file that cannot be written)
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def main(argv: list[str] | None = None) -> int:
    if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .procs import die_with_parent  # a rank of `accelerate launch`: never outlive the launcher

        die_with_parent(9)  # SIGKILL: the launcher (and its store) is gone; the last checkpoint stays valid
    try:
        out = run(argv)
        if out and out.get("_exit_code"):
            return int(out["_exit_code"])
    except NonFiniteLossError as exc:
        _say(f"error: run failed: {exc}")
        return 3
    except RunInterrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except RunFileWriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    except MethodNotApplicable as exc:  # same exit code; the prefix lets the leaderboard show n/a
        _say(f"error: not applicable: {exc}")
        return 2
    except MMBalanceError as exc:
        _say(f"error: {exc}")
        return 2
    except OSError as exc:  # a folder or lock file the run cannot create (no permission, read-only, full disk)
        if exc.errno not in _WRITE_ERRNOS:
            raise
        where = f"{exc.filename!r}: " if exc.filename else ""
        print(f"error: cannot write {where}{exc.strerror or exc}; nothing was changed (fix the folder's "
              "permissions or free disk space, or choose another --output-dir/--run-dir)", file=sys.stderr)
        return 4
    except BrokenPipeError:  # `--list | head`: the reader went away; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
