"""UME and UMT (docs/methods/ume.md §8, umt.md §8) and the shared unimodal-model cache."""
from __future__ import annotations

import pytest
import torch

from mmbalance.errors import MethodNotApplicable
from mmbalance.registry import create_model
from mmbalance.teachers import TEACHER_DIR, TEACHER_FILE, train_unimodal
from mmbalance.testing import first_batch
from tests.conftest import SMALL_MFEAT

SMALL_SEG = {"dataset.n_samples": 30, "dataset.image_size": 8}
SMALL_REG = {"dataset.n_samples": 80}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One output dir (hence one teacher cache) for the tests that do not test the cache itself."""
    return tmp_path_factory.mktemp("umt_shared")


def _trainer(method, dataset, tmp_path, sets=None, epochs=1, out="out"):
    """A constructed Trainer whose output dir (hence teacher cache) is tmp_path/out."""
    from mmbalance.engine import Trainer
    from mmbalance.run import build_parser, resolve
    from mmbalance.testing import cli_args

    sets = {**(SMALL_MFEAT if dataset.startswith("mfeat") else {}), **(sets or {})}
    argv = cli_args(method, dataset, epochs=epochs, sets=sets) + ["--output-dir", str(tmp_path / out)]
    config, train_cfg, data, meth, rdir = resolve(build_parser().parse_args(argv))
    return Trainer(config, train_cfg, data, meth, rdir, quiet=True)


# ---------------------------------------------------------------- UME
def test_ume_output_is_mean_of_unimodal_outputs_all_tasks(shared):
    """ume.md §8 tests 1-2: ensemble = mean of the M unimodal outputs; no fusion parameters."""
    for dataset, sets in (("mfeat", {}), ("synthetic-regression", SMALL_REG), ("synthetic-seg", SMALL_SEG)):
        tr = _trainer("ume", dataset, shared, sets)
        ctx = tr.ctx
        batch = first_batch(tr)
        teachers = {m: train_unimodal(ctx, m)[0] for m in ctx.modalities}  # cache hits, eval mode
        ctx.model.eval()  # as in the engine's evaluation (BatchNorm of the segmentation members)
        with torch.no_grad():
            got = tr.method.predict(ctx, batch)
            want = sum(teachers[m]({m: batch[m]}).logits for m in ctx.modalities) / len(ctx.modalities)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        n_model = sum(p.numel() for p in ctx.raw_model.parameters())
        assert n_model == sum(p.numel() for t in teachers.values() for p in t.parameters()), dataset


def test_ume_probs_average_differs_from_logits_on_confident_vs_flat():
    """ume.md §8 test 4: one confident and one flat model."""
    from mmbalance.methods.ume import UnimodalEnsemble

    members = {m: create_model("mlp_concat", modalities=[m], input_shapes={m: (4,)}, out_dim=3) for m in ("a", "b")}
    confident = torch.tensor([[4.0, 0.0, 0.0]])   # softmax ≈ (0.96, 0.02, 0.02)
    flat = torch.tensor([[-10.0, 1.0, 0.0]])      # unsure between 1 and 2, sure it is not 0
    lg = UnimodalEnsemble(members, "logits").combine([confident, flat])
    pr = UnimodalEnsemble(members, "probs").combine([confident, flat])
    assert lg.argmax(-1).item() == 1 and pr.argmax(-1).item() == 0
    torch.testing.assert_close(pr.exp(), (confident.softmax(-1) + flat.softmax(-1)) / 2)


def test_unimodal_cache_is_reused_across_ume_and_umt(tmp_path):
    """umt.md §8 test 5 / ume.md §8 test 3: the teachers are trained once per key."""
    tr1 = _trainer("ume", "mfeat", tmp_path)
    assert [i.trained_now for i in tr1.method.teachers] == [True, True, True]
    files = sorted((tmp_path / "out" / TEACHER_DIR).glob(f"*/{TEACHER_FILE}"))
    assert len(files) == 3
    mtimes = [f.stat().st_mtime_ns for f in files]
    tr1.fit()
    tr2 = _trainer("ume", "mfeat", tmp_path)
    tr3 = _trainer("umt", "mfeat", tmp_path)
    for tr in (tr2, tr3):
        assert [i.trained_now for i in tr.method.teachers] == [False] * 3
        assert "teachers_trained_now" not in tr.method.metrics()  # a per-process fact: not in the run files
        assert tr.method.metrics()["teacher_train_seconds"] > 0  # the cost is still charged
    assert [f.stat().st_mtime_ns for f in files] == mtimes


# ---------------------------------------------------------------- UMT
def test_umt_distillation_zero_for_teacher_copies_and_teachers_frozen(shared):
    """umt.md §8 tests 1 and 3."""
    tr = _trainer("umt", "mfeat", shared, {"student_init": "teacher"})
    ctx, meth = tr.ctx, tr.method
    batch = first_batch(tr)
    out = ctx.forward(batch)
    assert float(meth.distill_loss(ctx, batch, out.features)) == 0.0
    before = {m: {k: v.clone() for k, v in ctx.modules[f"umt_teacher_{m}"].state_dict().items()} for m in ctx.modalities}
    tr.fit()
    for m in ctx.modalities:
        t = ctx.modules[f"umt_teacher_{m}"]
        assert not t.training and not any(p.requires_grad for p in t.parameters())
        for k, v in t.state_dict().items():
            assert torch.equal(v, before[m][k]), (m, k)
        x = {m: batch[m]}
        assert torch.equal(t(x).logits, t(x).logits)


def test_umt_distillation_gradient_reaches_encoders_only(shared):
    """umt.md §8 test 4."""
    tr = _trainer("umt", "mfeat", shared)
    ctx, meth, model = tr.ctx, tr.method, tr.ctx.raw_model
    batch = first_batch(tr)
    out = ctx.forward(batch)
    d = meth.distill_loss(ctx, batch, out.features)
    assert float(d) > 0
    enc = [p for m in ctx.modalities for p in model.encoders[m].parameters()]
    rest = list(model.fusion.parameters()) + list(model.head.parameters())
    grads = torch.autograd.grad(d, enc + rest, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads[:len(enc)])
    assert all(g is None or g.abs().sum() == 0 for g in grads[len(enc):])


def test_umt_lambda_zero_reproduces_baseline(shared, run_cli):
    """umt.md §8 test 2 (same seed; the teacher phase aside)."""
    _, _, base = run_cli("baseline", "mfeat", epochs=1, sets=SMALL_MFEAT)
    _, _, umt = run_cli("umt", "mfeat", epochs=1, sets={**SMALL_MFEAT, "lam": 0}, extra=["--output-dir", str(shared / "out")])
    assert umt["val"] == base["val"] and umt["test"] == base["test"]


def test_umt_shape_mismatch_needs_projector(shared, monkeypatch):
    """umt.md §8 test 6: MethodNotApplicable naming both shapes; projector=true adds a projector."""
    import mmbalance.methods.umt as umt_mod

    from mmbalance.teachers import train_unimodal as real

    def narrow(ctx, m):
        t, info = real(ctx, m)
        small = create_model("mlp_concat", modalities=[m], input_shapes=ctx.data.input_shapes, out_dim=10, enc_out=32)
        return small.eval().requires_grad_(False), info

    monkeypatch.setattr(umt_mod, "train_unimodal", narrow)
    try:
        _trainer("umt", "mfeat", shared)
        raise AssertionError("expected MethodNotApplicable")
    except MethodNotApplicable as exc:
        assert "width 64" in str(exc) and "width 32" in str(exc)
    tr = _trainer("umt", "mfeat", shared, {"projector": True})
    batch = first_batch(tr)
    out = tr.ctx.forward(batch)
    assert torch.isfinite(tr.method.distill_loss(tr.ctx, batch, out.features))


def test_choice_rule_uses_validation_direction():
    from mmbalance.methods.umt import choose_umt_or_ume, umt_ume_auto

    assert choose_umt_or_ume({"accuracy": 0.91}, {"accuracy": 0.90}, "classification") == "umt"
    assert choose_umt_or_ume({"accuracy": 0.90}, {"accuracy": 0.90}, "classification") == "ume"
    assert choose_umt_or_ume({"mae": 0.5}, {"mae": 0.6}, "regression") == "umt"
    assert choose_umt_or_ume({"mae": 0.7}, {"mae": 0.6}, "regression") == "ume"
    rec = {"status": "ok", "task": "classification", "primary_metric": "accuracy", "higher_is_better": True}
    auto = umt_ume_auto({**rec, "val": {"accuracy": 0.8}, "test": {"accuracy": 0.1}},
                        {**rec, "val": {"accuracy": 0.9}, "test": {"accuracy": 0.7}},
                        {**rec, "val": {"accuracy": 0.95}, "test": {"accuracy": 0.99}})
    assert auto["choice"] == "ume" and auto["test"]["accuracy"] == 0.7


@pytest.mark.parametrize("method,dataset,sets", [("umt", "synthetic-regression", SMALL_REG), ("ume", "mfeat", SMALL_MFEAT),
                                                 ("umt", "synthetic-seg", SMALL_SEG)])
def test_smoke_cli(shared, run_cli, method, dataset, sets):
    code, _, res = run_cli(method, dataset, epochs=2, sets=sets, extra=["--output-dir", str(shared / "smoke")])
    assert code == 0 and res["status"] == "ok" and res["method_metrics"]["teacher_train_seconds"] > 0


def test_parallel_runs_share_one_teacher_training(tmp_path):
    """Two processes asking for the same teacher at once (leaderboard workers) train it once and both
    finish: the cache entry is locked while it is built."""
    import subprocess
    import sys

    from conftest import REPO

    procs = [subprocess.Popen([sys.executable, "-m", "mmbalance.run", "--method", m, "--dataset", "mfeat",
                               "--epochs", "1", "--set", "dataset.limit_per_class=20", "--output-dir", str(tmp_path),
                               "--run-dir", str(tmp_path / m), "--quiet"], cwd=REPO, stderr=subprocess.PIPE, text=True)
             for m in ("ume", "umt")]
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    teachers = list((tmp_path / "_teachers").glob("*/teacher.pt"))
    assert len(teachers) == 3  # one per modality, shared by both runs


# ---------------------------------------------------------------- oracles (mutation-tested)
def test_umt_loss_by_hand_teachers_stay_in_eval_mode_and_student_starts_from_scratch(shared):
    """L = ℓ(ŷ, y) + λ·Σ_m mean((z_m − t_m)²) written out here; teachers (with dropout) stay in eval
    mode through the step; the student encoders are not the teachers' by default."""
    tr = _trainer("umt", "mfeat", shared, {"model.dropout": 0.5, "lam": 3.0})
    ctx, meth = tr.ctx, tr.method
    batch = first_batch(tr)
    teachers = {m: ctx.modules[f"umt_teacher_{m}"] for m in ctx.modalities}
    for m, t in teachers.items():
        s_enc, t_enc = ctx.raw_model.encoders[m].state_dict(), t.encoders[m].state_dict()
        assert any(not torch.equal(s_enc[k], t_enc[k]) for k in s_enc), m
    torch.manual_seed(3)
    out = meth.training_step(ctx, batch)
    assert not any(t.training for t in teachers.values())
    with torch.no_grad():
        distill = sum(((out.output.features[m].double() - teachers[m].encode({m: batch[m]})[m].double()) ** 2).mean()
                      for m in ctx.modalities)
        task = torch.nn.functional.cross_entropy(out.output.logits.double(), batch["label"])
    assert float(distill) > 0
    assert float(out.loss) == pytest.approx(float(task + 3.0 * distill), rel=1e-5)


def test_ume_per_modality_prediction_zeroes_the_absent_members(shared):
    tr = _trainer("ume", "mfeat", shared)
    ctx = tr.ctx
    batch = first_batch(tr)
    teachers = {m: train_unimodal(ctx, m)[0] for m in ctx.modalities}
    ctx.model.eval()
    m0, others = ctx.modalities[0], tuple(ctx.modalities[1:])
    with torch.no_grad():
        got = tr.method.predict(ctx, batch, absent=others)
        want = (teachers[m0]({m0: batch[m0]}).logits
                + sum(teachers[m]({m: torch.zeros_like(batch[m])}).logits for m in others)) / len(ctx.modalities)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
