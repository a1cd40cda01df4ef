"""What a user of a training tool expects: the README's "Adding a method" section runs as written, plug-ins
(file, module, entry point), broken modules shown and refused with their error, did-you-mean, exact exit
codes (also under the launcher), crash records, console output for terminals and logs, --print-config and
--dry-run, TensorBoard scalars, LaTeX export, provenance in result.json, and every docs/ path cited exists."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmbalance.run", *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


TINY = ["--dataset", "mfeat", "--epochs", "2", "--set", "dataset.limit_per_class=10"]


# ------------------------------------------------------------------------------------------ README
def _readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {title}")
    nxt = text.find("\n## ", start + 1)
    return text[start:nxt if nxt > 0 else None]


def test_readme_adding_a_method_runs_as_written(tmp_path):
    """Every code block of the section: the python block is the plug-in file, each bash line runs as is."""
    sec = _readme_section("Adding a method")
    blocks = re.findall(r"```(\w+)\n(.*?)```", sec, re.S)
    py = [b for lang, b in blocks if lang == "python"]
    sh = [b for lang, b in blocks if lang == "bash"]
    assert len(py) == 1 and sh, "the section must keep one plug-in file and its commands"
    (tmp_path / "my_method.py").write_text(py[0])
    for line in (ln for b in sh for ln in b.splitlines() if ln.strip() and not ln.startswith("#")):
        res = subprocess.run(line, shell=True, cwd=tmp_path, env=_env(MMBALANCE_NO_PROGRESS="1"),
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{line}\n{res.stdout}\n{res.stderr}"
    (run_dir,) = (tmp_path / "runs_example" / "mfeat" / "grad_eq").glob("seed0-*")  # seed0-<config hash>
    assert json.loads((run_dir / "result.json").read_text())["status"] == "ok"
    assert json.loads((run_dir / "config.json").read_text())["method_hparams"]["alpha"] == 0.8
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(f"grad_eq/scale/{m}" in rows[-1] for m in ("fac", "fou", "mor"))
    # alpha = 0.8 pulls norms toward the mean: the scales are not all 1 and bracket 1
    scales = [rows[-1][f"grad_eq/scale/{m}"] for m in ("fac", "fou", "mor")]
    assert min(scales) < 1.0 < max(scales)


# ------------------------------------------------------------------------------------------ plug-ins
def test_entry_point_plugin_is_registered(tmp_path):
    site = tmp_path / "site"
    (site / "fakeplug-0.1.dist-info").mkdir(parents=True)
    (site / "fakeplug-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n")
    (site / "fakeplug-0.1.dist-info" / "entry_points.txt").write_text("[mmbalance.methods]\nfake_ep = fakeplug_mod\n")
    (site / "fakeplug_mod.py").write_text(textwrap.dedent('''
        from mmbalance.interface import BalancingMethod
        from mmbalance.registry import register_method

        @register_method("fake_ep", "a method from an installed package")
        class FakeEP(BalancingMethod):
            name = "fake_ep"
    '''))
    res = _run(["--list"], tmp_path, PYTHONPATH=f"{REPO}{os.pathsep}{site}")
    assert res.returncode == 0, res.stderr
    assert "fake_ep" in res.stdout and "a method from an installed package" in res.stdout
    res = _run(["--method", "fake_ep", *TINY, "--output-dir", str(tmp_path / "r"), "--quiet"], tmp_path,
               PYTHONPATH=f"{REPO}{os.pathsep}{site}")
    assert res.returncode == 0, res.stderr


def test_broken_plugin_is_listed_with_its_error_and_refused(tmp_path):
    bad = tmp_path / "brokenthing.py"
    bad.write_text("import not_a_module_anywhere\n")
    res = _run(["--list"], tmp_path, MMBALANCE_PLUGINS=str(bad))
    assert res.returncode == 1
    assert "broken" in res.stdout and "not_a_module_anywhere" in res.stdout
    res = _run(["--plugin", str(bad), "--method", "baseline", *TINY], tmp_path)
    assert res.returncode == 2 and "brokenthing" in res.stderr and "not_a_module_anywhere" in res.stderr


def test_broken_builtin_module_name_fails_with_its_error():
    from mmbalance.errors import RegistryError
    from mmbalance.registry import Registry

    reg = Registry("method")
    reg._broken["mmbalance.methods.foo"] = "ImportError: no bar"
    with pytest.raises(RegistryError, match="'foo' is broken.*no bar"):
        reg.get("foo")
    with pytest.raises(RegistryError, match="'foo_strong' is broken"):
        reg.get("foo_strong")


def test_did_you_mean(tmp_path):
    res = _run(["--method", "cgm", "--dataset", "mfeat"], tmp_path)
    assert res.returncode == 2 and "did you mean 'cggm'" in res.stderr
    res = _run(["--method", "baseline", "--dataset", "mfeat-hrd"], tmp_path)
    assert res.returncode == 2 and "did you mean 'mfeat-hard'" in res.stderr


def test_list_shows_tasks_and_hyperparameters(tmp_path):
    res = _run(["--list"], tmp_path)
    assert res.returncode == 0
    block = res.stdout.split("\n  ogm_ge ", 1)[1].split("\n  ", 3)
    assert "tasks: classification" in res.stdout.split("\n  ogm_ge ", 1)[1][:400]
    assert "alpha=0.1" in "".join(block[:3])


# ------------------------------------------------------------------------------------------ exit codes
def test_bad_seed_and_output_dir_that_is_a_file_exit_2_writing_nothing(tmp_path):
    res = _run(["--seed", "-1", *TINY, "--output-dir", str(tmp_path / "o")], tmp_path)
    assert res.returncode == 2 and "--seed -1" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()
    f = tmp_path / "afile"
    f.write_text("x")
    res = _run([*TINY, "--output-dir", str(f)], tmp_path)
    assert res.returncode == 2 and "is not a folder" in res.stderr and "Traceback" not in res.stderr
    assert f.read_text() == "x"


def test_crash_inside_a_method_leaves_a_failed_result(tmp_path):
    plug = tmp_path / "crashy.py"
    plug.write_text(textwrap.dedent('''
        from mmbalance.interface import BalancingMethod
        from mmbalance.registry import register_method

        @register_method("crashy", "raises in after_backward at the 2nd epoch")
        class Crashy(BalancingMethod):
            name = "crashy"
            def after_backward(self, ctx):
                if ctx.epoch == 1:
                    raise RuntimeError("boom in a method")
    '''))
    out = tmp_path / "run"
    res = _run(["--plugin", str(plug), "--method", "crashy", *TINY, "--run-dir", str(out), "--quiet"], tmp_path)
    assert res.returncode == 1 and "boom in a method" in res.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "failed" and "boom in a method" in result["error"]
    assert "after_backward" in result["traceback"]


def test_launcher_keeps_exit_code_2_without_accelerate_traceback(tmp_path):
    cmd = [sys.executable, "-m", "mmbalance.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--", "--method", "nope", "--dataset", "mfeat"]
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2, res.stderr
    assert "unknown method 'nope'" in res.stderr
    assert "Traceback" not in res.stderr and "CalledProcessError" not in res.stderr


# ------------------------------------------------------------------------------------------ console
def test_log_file_output_is_plain_lines_and_quiet_keeps_the_result_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MMBALANCE_NO_PROGRESS"}
    base = [sys.executable, "-m", "mmbalance.run", "--method", "baseline", *TINY]
    res = subprocess.run(base + ["--run-dir", str(tmp_path / "a")], cwd=tmp_path, capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(REPO)}, timeout=300)
    assert res.returncode == 0
    assert "\r" not in res.stderr  # not a terminal: no carriage-return progress bar
    assert re.search(r"epoch 1/2, train_loss \d\.\d{4}, val_accuracy \d\.\d{4}", res.stderr)
    assert "epoch 2/2" in res.stderr
    res = subprocess.run(base + ["--run-dir", str(tmp_path / "b"), "--quiet"], cwd=tmp_path, capture_output=True,
                         text=True, env={**env, "PYTHONPATH": str(REPO)}, timeout=300)
    assert "epoch 1/2" not in res.stderr
    assert "baseline on mfeat (seed 0): val accuracy" in res.stdout


def test_progress_prints_steps_inside_long_epochs():
    import io

    from mmbalance.progress import Progress

    buf = io.StringIO()
    p = Progress("m on d", total_epochs=2, done_epochs=0, steps_per_epoch=64, stream=buf, interval=0.0, tty=False)
    for _ in range(32):
        p.step()
    assert "epoch 1/2, step 16/64" in buf.getvalue() and "step 32/64" in buf.getvalue()
    p.epoch_done({"train_loss": 0.5, "val": {"accuracy": 0.25}, "epoch_seconds": 1.0}, "accuracy")
    assert "epoch 1/2, train_loss 0.5000, val_accuracy 0.2500, 1.0 s" in buf.getvalue()


def test_unimodal_run_prints_no_empty_per_modality_part(tmp_path):
    res = _run(["--method", "unimodal:fac", *TINY, "--run-dir", str(tmp_path / "u"), "--quiet"], tmp_path)
    assert res.returncode == 0 and "test accuracy" in res.stdout and "per-modality" not in res.stdout


def test_print_config_and_dry_run_write_nothing(tmp_path):
    res = _run(["--method", "ogm_ge", *TINY, "--set", "alpha=0.3", "--print-config", "--output-dir",
                str(tmp_path / "o")], tmp_path)
    assert res.returncode == 0
    cfg = json.loads(res.stdout)
    assert cfg["method_hparams"]["alpha"] == 0.3 and cfg["train"]["epochs"] == 2
    res = _run(["--method", "cggm", *TINY, "--dry-run", "--output-dir", str(tmp_path / "o")], tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["parameters"]["model"] > 0 and out["parameters"]["method_modules"] > 0  # CGGM's classifiers
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ trackers, provenance
def test_tensorboard_scalars_match_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "tb"
    res = _run(["--method", "baseline", *TINY, "--epochs", "3", "--run-dir", str(run_dir), "--log-with",
                "tensorboard", "--quiet"], tmp_path)
    assert res.returncode == 0, res.stderr
    logdir = next((run_dir / "trackers").iterdir())
    ea = EventAccumulator(str(logdir))
    ea.Reload()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    got = [(e.step, e.value) for e in ea.Scalars("val/accuracy")]
    assert [s for s, _ in got] == [1, 2, 3]
    assert [v for _, v in got] == pytest.approx([r["val"]["accuracy"] for r in rows], abs=1e-6)
    assert [e.value for e in ea.Scalars("train_loss")] == pytest.approx([r["train_loss"] for r in rows], rel=1e-6)
    assert "val_per_modality/fou/accuracy" in ea.Tags()["scalars"]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["parameters"]["model"] == result["parameters"]["trainable"] > 0
    assert set(result["code"]) == {"git_commit", "dirty"}


def test_unknown_tracker_is_bad_input(tmp_path):
    res = _run(["--method", "baseline", *TINY, "--log-with", "tensorbored"], tmp_path)
    assert res.returncode == 2 and "tensorboard" in res.stderr


# ------------------------------------------------------------------------------------------ leaderboard export
def test_latex_export_bolds_the_best_and_marks_significance(tmp_path):
    from mmbalance.leaderboard import main

    out = tmp_path / "lb"
    # the committed leaderboard (its compact store; the run folders are not in git)
    assert main(["build", "quick-v1", "--untuned", "--out-dir", str(out), "--format", "latex"]) == 0
    tex = (out / "results.tex").read_text()
    assert tex.count("\\begin{tabular}") == tex.count("\\bottomrule") >= 1 and "\\toprule" in tex
    with open(out / "results.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["dataset"] == "mfeat" and ":" not in r["method"]]
    best = max(float(r["test_accuracy_mean"]) for r in rows if r.get("test_accuracy_mean"))
    mfeat = tex.split("% mfeat:")[1].split("\\end{table}")[0]
    assert f"\\textbf{{{best:.4f}}}" in mfeat


def test_reproduce_command_of_a_suite_outside_leaderboard_is_its_path(tmp_path):
    from mmbalance.leaderboard.suite import load_suite

    p = tmp_path / "elsewhere" / "mine.toml"
    p.parent.mkdir()
    p.write_text('datasets = ["mfeat"]\nmethods = ["baseline"]\n')
    assert load_suite(p).display_path() == str(p.resolve())
    assert load_suite("quick").display_path() == "leaderboard/suites/quick.toml"
# ------------------------------------------------------------------------------------------ docs
def test_every_cited_docs_path_exists_and_no_steering_specs_are_cited():
    cited: set[str] = set()
    bad: list[str] = []
    files = [p for d in ("mmbalance", "methods", "datasets") for p in (REPO / d).rglob("*.py")]
    files += list((REPO / "leaderboard" / "suites").glob("*.toml")) + [REPO / "README.md", REPO / "pyproject.toml"]
    files += list((REPO / "docs").rglob("*.md"))
    for f in files:
        text = f.read_text()
        cited |= {m.rstrip(".)`,") for m in re.findall(r"docs/[A-Za-z0-9_./-]+", text)}
        if re.search(r"\.\./shared|specs/methods/|specs/datasets/|/work/shared|DESIGN\.md", text):
            bad.append(str(f.relative_to(REPO)))
    assert not bad, f"files citing the steering specs instead of docs/: {bad}"
    missing = sorted(c for c in cited if not ((REPO / c).exists() or (REPO / f"{c}.md").exists()))
    assert not missing, f"cited docs paths that do not exist: {missing}"
