"""Behavioural tests of OPM (docs/methods/opm.md "What the tests check"): closed forms of q and θ, the
drop's role and rate, the rescale, the θ-gradient fix, warm-up and evaluation, the probe path, the
refusals, resume, and runs on every task and fusion kind."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MFEAT
from mmbalance.methods.opm import (
    OPMHParams,
    auto_warmup_epochs,
    draw_keep,
    drop_probabilities,
    opm_ratios,
    shared_theta,
)

from mmbalance.errors import ConfigError, MethodNotApplicable
from mmbalance.testing import build_trainer, first_batch

FAST = {**SMALL_MFEAT, "train.modality_eval": "none", "train.diagnostics": "none"}
TWO = {"dataset.n_modalities": 2, "dataset.n_samples": 60, "train.modality_eval": "none", "train.diagnostics": "none"}


def _q(s, ratio="mean_others", q_base=0.5, lam=0.5):
    return drop_probabilities(opm_ratios(torch.tensor(s, dtype=torch.float64), ratio), q_base, lam)


# ---------------------------------------------------------------- closed forms (opm.md §7.1–3)
def test_closed_form_q_theta_and_multiplier():
    q = _q([30.0, 20.0])
    assert q.tolist() == pytest.approx([0.615529, 0.0], abs=1e-6)
    theta = shared_theta(q, torch.tensor([512.0, 512.0]))
    assert float(theta) == pytest.approx(0.307765, abs=1e-6)
    assert 1 / (1 - float(theta)) == pytest.approx(1.444595, abs=1e-6)
    assert _q([20.0, 20.0]).tolist() == [0.0, 0.0]
    assert _q([1 + 1e-7, 1.0]).tolist()[0] == pytest.approx(0.5, abs=1e-7)  # the jump at ρ = 1 is kept


def test_unequal_dims_weight_theta_in_modality_order():
    q = _q([30.0, 20.0])
    theta = float(shared_theta(q, torch.tensor([512.0, 256.0])))
    assert theta == pytest.approx(0.410353, abs=1e-6)
    assert 1 / (1 - theta) == pytest.approx(1.695930, abs=1e-6)


def test_three_modalities_ratio_modes_and_the_weakest_is_never_dropped():
    assert _q([3.0, 1.0, 1.0]).tolist() == pytest.approx([0.741007, 0, 0], abs=1e-6)
    assert _q([3.0, 1.0, 1.0], "sum_others").tolist() == pytest.approx([0.615529, 0, 0], abs=1e-6)
    q = _q([3.0, 3.0, 1.0])
    assert q.tolist() == pytest.approx([0.615529, 0.615529, 0.0], abs=1e-6)
    g = torch.Generator().manual_seed(0)
    _, keep = draw_keep(q.float(), 10_000, 1.0, g)
    assert bool(keep[:, 2].all())
    assert not bool(keep[:, :2].all())


def test_auto_warmup():
    assert [auto_warmup_epochs(e) for e in (100, 50, 40, 30, 80, 150, 3)] == [6, 3, 2, 2, 5, 9, 1]


# ---------------------------------------------------------------- the hook on a real model
def _trainer(tmp_path, name="r", method="opm", dataset="synthetic", epochs=1, **sets):
    base = FAST if dataset.startswith(("mfeat", "avdigits")) else TWO
    return build_trainer(method, dataset, run_dir=tmp_path / name, epochs=epochs, sets={**base, **sets})


def _hook_once(tr, z: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
    method, fusion = tr.method, tr.ctx.raw_model.fusion
    fusion.train()
    method._y = y
    try:
        return method._fusion_hook(fusion, (z,))[0]
    finally:
        method._y = None


def test_only_the_dominant_modality_is_dropped_at_rate_pexe_q(tmp_path):
    """u_a = 5·onehot(y), u_v = 0: only a's rows are ever zeroed; steps execute at p_exe and an executed
    step drops a row at q_a (each within 3 standard errors); with the roles swapped the drops move to v."""
    tr = _trainer(tmp_path, p_exe=0.7, warmup_epochs=0)
    a, v = tr.ctx.modalities
    n, steps = 16, 300
    y = torch.arange(n) % 2
    onehot = F.one_hot(y, tr.ctx.raw_model.out_dim).float()
    s_dom = float(onehot.mul(5).softmax(-1).gather(1, y[:, None]).sum())
    s_weak = float(torch.zeros_like(onehot).softmax(-1).gather(1, y[:, None]).sum())
    q_dom = 0.5 * (1 + 0.5 * math.tanh(s_dom / s_weak - 1))  # closed form of calcu_q
    z = {m: torch.rand(n, tr.ctx.raw_model.feature_dims[m]) + 0.5 for m in (a, v)}
    for dominant, other in ((a, v), (v, a)):
        tr.method._unimodal = lambda ctx, inputs, live, d=dominant: {
            m: (5 * onehot if m == d else torch.zeros_like(onehot)) for m in (a, v)}
        dropped, executed = {a: 0, v: 0}, 0
        for _ in range(steps):
            out = _hook_once(tr, z, y)
            executed += bool(tr.method.last["executed"])
            for m in (a, v):
                dropped[m] += int((out[m].abs().sum(1) == 0).sum())
        assert dropped[other] == 0
        assert abs(executed / steps - 0.7) < 3 * math.sqrt(0.7 * 0.3 / steps)
        rows = executed * n
        assert abs(dropped[dominant] / rows - q_dom) < 3 * math.sqrt(q_dom * (1 - q_dom) / rows), (dropped, q_dom)


def test_rescale_of_kept_rows_and_untouched_inputs_when_not_executed(tmp_path):
    n = 400
    y = torch.zeros(n, dtype=torch.long)
    # unequal widths (audio 32, image 64): θ weights q by each modality's own width
    tr = _trainer(tmp_path, "exec", dataset="avdigits-small", p_exe=1.0, warmup_epochs=0, **{"model.audio_hidden": 32})
    a, v = tr.ctx.modalities
    tr.method._scores = lambda ctx, u: torch.tensor([30.0, 20.0])
    z = {m: torch.rand(n, tr.ctx.raw_model.feature_dims[m]) + 0.5 for m in (a, v)}
    dims = [tr.ctx.raw_model.feature_dims[m] for m in (a, v)]
    assert dims == [32, 64]
    q_a = 0.5 * (1 + 0.5 * math.tanh(0.5))
    mult = 1 / (1 - q_a * dims[0] / sum(dims))
    out = _hook_once(tr, z, y)
    kept = out[a].abs().sum(1) > 0
    assert 0 < int(kept.sum()) < n
    assert torch.allclose(out[a][kept], mult * z[a][kept], atol=1e-6, rtol=0)
    assert torch.allclose(out[v], mult * z[v], atol=1e-6, rtol=0)  # the kept modality is amplified too (official)
    tr.method.hp.p_exe = 0.0
    out0 = _hook_once(tr, z, y)
    assert all(torch.equal(out0[m], z[m]) for m in (a, v))


@pytest.mark.parametrize("theta_grad", ["none", "official"])
def test_theta_is_a_constant_unless_official(tmp_path, theta_grad):
    """Encoder gradients of one executed step equal the baseline loss on the same masked, rescaled inputs
    (κ and θ injected, computed by hand); ``official`` adds exactly ∇(θ²/2) through the scores."""
    tr = _trainer(tmp_path, theta_grad, dataset="mfeat", p_exe=1.0, warmup_epochs=0, theta_grad=theta_grad)
    ctx, method, model = tr.ctx, tr.method, tr.ctx.raw_model
    batch = first_batch(tr)
    y = batch["label"]
    out = method.training_step(ctx, batch)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("encoders")}
    keep = method.last["keep_global"].float()
    assert bool(method.last["executed"]) and float(method.last["theta"]) > 0
    model.zero_grad(set_to_none=True)
    # oracle: z̄ → κ·z̄/(1 − θ) → concat head, θ from the recorded q and the widths
    mods = ctx.modalities
    dims = torch.tensor([float(model.feature_dims[m]) for m in mods])
    q = method.last["q"].float()
    theta = (dims * q).sum() / dims.sum()
    z = {m: model.encoders[m](batch[m]) for m in mods}
    logits = model.head(torch.cat([keep[:, k:k + 1] * z[m] / (1 - theta) for k, m in enumerate(mods)], 1))
    loss = F.cross_entropy(logits, y)
    if theta_grad == "official":  # + θ²/2 with θ from the live scores of the detached head
        w, b = model.final_layer().weight.detach(), model.final_layer().bias.detach() / len(mods)
        sl = model.split_head()
        s = torch.stack([(z[m] @ w[:, sl[m]].t() + b).softmax(-1).gather(1, y[:, None]).sum() for m in mods])
        rho = torch.stack([s[k] / ((s.sum() - s[k]) / (len(mods) - 1)) for k in range(len(mods))])
        ql = torch.where((rho > 1) & (q > 0), 0.5 * (1 + 0.5 * torch.tanh(rho - 1)), torch.zeros_like(rho))
        loss = loss + 0.5 * ((dims * ql).sum() / dims.sum()) ** 2
    loss.backward()
    for n, p in model.named_parameters():
        if n.startswith("encoders"):
            assert torch.allclose(got[n], p.grad, atol=1e-7, rtol=1e-5), n


def test_warmup_step_is_the_baseline_step_bitwise(run_cli):
    _, _, base = run_cli("baseline", "mfeat", epochs=1, sets=FAST, run_dir=None)
    _, rd, opm = run_cli("opm", "mfeat", epochs=1, sets={**FAST, "warmup_epochs": 1})
    assert opm["test"] == base["test"] and opm["val"] == base["val"]
    row = json.loads((rd / "metrics.jsonl").read_text().splitlines()[0])
    assert not any(k.startswith("opm/") for k in row)  # no drop statistics in the warm-up


def test_evaluation_never_drops(tmp_path):
    tr, base = _trainer(tmp_path, "o", warmup_epochs=0, p_exe=1.0), _trainer(tmp_path, "b", "baseline")
    batch = first_batch(tr)
    for t in (tr, base):
        t.ctx.model.eval()
    tr.method._y = batch["label"]  # a training step left armed by mistake: eval mode still passes through
    assert torch.equal(tr.method.predict(tr.ctx, batch), base.method.predict(base.ctx, batch))


def test_probes_send_no_gradient_into_the_model(tmp_path):
    """score_source=aux_probe with the drop never executed: encoder and head gradients equal the baseline's."""
    tr = _trainer(tmp_path, "p", score_source="aux_probe", p_exe=0.0, warmup_epochs=0)
    base = _trainer(tmp_path, "b", "baseline")
    batch = first_batch(tr)
    for t in (tr, base):
        t.method.training_step(t.ctx, batch).loss.backward()
    pb = dict(base.ctx.raw_model.named_parameters())
    for n, p in tr.ctx.raw_model.named_parameters():
        assert torch.equal(p.grad, pb[n].grad), n
    assert all(p.grad is not None for p in tr.ctx.modules["opm_probes"].parameters())


def test_refusals(tmp_path):
    with pytest.raises(MethodNotApplicable, match="MMTM"):
        _trainer(tmp_path, "mmtm", dataset="mfeat", **{"model.name": "mlp_mmtm"})
    with pytest.raises(ConfigError, match="head_split"):
        _trainer(tmp_path, "hs", dataset="mfeat", score_source="head_split", **{"model.name": "mlp_transformer_fusion"})
    with pytest.raises(ConfigError, match="theta_grad"):
        _trainer(tmp_path, "tg", dataset="mfeat", theta_grad="official", score_source="aux_probe")
    with pytest.raises(ValueError, match="q_base"):
        OPMHParams(q_base=1.5).validate()


@pytest.mark.parametrize("dataset,sets", [
    ("synthetic-regression", {"dataset.n_samples": 40}),
    ("synthetic-seg", {"dataset.n_samples": 40, "train.batch_size": 8}),
    ("synthetic", {"dataset.n_modalities": 3, "dataset.feature": "sequence", "dataset.n_samples": 40}),
    ("mfeat", {**SMALL_MFEAT, "model.name": "mlp_transformer_fusion"}),
])
def test_drops_on_every_task_and_fusion(run_cli, dataset, sets):
    code, rd, res = run_cli("opm", dataset, epochs=1, sets={"warmup_epochs": 0, "p_exe": 1.0, "train.modality_eval": "none",
                                                          "train.diagnostics": "none", "train.max_steps_per_epoch": 2, **sets})
    assert code == 0 and res["status"] == "ok"
    row = json.loads((rd / "metrics.jsonl").read_text().splitlines()[0])
    assert row["opm/executed"] == 1.0 and math.isfinite(row["train_loss"])


def test_resume_reproduces_masks_and_numbers(kill_and_resume):
    sets = {**FAST, "warmup_epochs": 1}
    (full_dir, full), (code, rd, res) = kill_and_resume("opm", sets=sets, epochs=3, stop_after=2)
    assert code == 0 and res["test"] == full["test"] and res["val"] == full["val"]
    a = [json.loads(x) for x in (full_dir / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["opm/dropped_fac"] for r in a[1:]] == [r["opm/dropped_fac"] for r in b[1:]]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
