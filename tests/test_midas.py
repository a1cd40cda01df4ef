"""Behavioural tests of MIDAS (docs/methods/midas.md). Oracles: the paper's worked examples and closed forms
(soft labels, hard weight, α update), and the whole step's loss written out by hand with injected partners."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from mmbalance.methods.midas import alpha_update, draw_sources, hard_weights, misaligned_loss, soft_weights

from mmbalance.testing import build_trainer, first_batch

FAST = {"train.modality_eval": "none"}


# ---------------------------------------------------------------- closed forms
def test_soft_label_and_misaligned_loss_by_hand():
    c = soft_weights(torch.tensor([[0.9, 0.3]]))
    assert torch.allclose(c, torch.tensor([[0.75, 0.25]]))  # the paper's example
    logits = torch.zeros(1, 3)  # uniform p̃ over C = 3
    labels = torch.tensor([[0, 2]])
    h = torch.tensor([1 + (0.5 + 1) / 2])  # s̃ = 0.5 → h = 1.75
    loss = misaligned_loss(logits, labels, c, torch.tensor([1.0, 1.0]), h)
    assert float(loss) == pytest.approx(1.75 * math.log(3), abs=1e-6)  # 1.922572
    loss = misaligned_loss(logits, labels, c, torch.tensor([1.0, 1.2]), h)
    assert float(loss) == pytest.approx(1.75 * (0.75 + 1.2 * 0.25) * math.log(3), abs=1e-6)  # 2.018700, not renormalised


def test_hard_weight_uses_the_replaced_modality():
    pooled = {"a": torch.tensor([[2.0, 5.0], [2.0, 5.0]]),  # modality 1 identical in both samples (cos 1)
              "b": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}  # modality 2: cos = 1/√2
    src = torch.tensor([[0, 1], [1, 0]])  # row 0 = (f_0^a, f_1^b): b replaced; row 1 = (f_1^a, f_0^b): a replaced
    anchor = torch.tensor([0, 0])
    h = hard_weights(pooled, src, anchor)
    assert float(h[0]) == pytest.approx(1 + (1 / math.sqrt(2) + 1) / 2, abs=1e-6)  # 1.853553
    assert float(h[1]) == pytest.approx(2.0, abs=1e-6)  # equal features
    opposite = {"a": pooled["a"], "b": torch.tensor([[1.0, 0.0], [-1.0, 0.0]])}
    assert float(hard_weights(opposite, src, anchor)[0]) == pytest.approx(1.0, abs=1e-6)


def test_alpha_update_by_hand():
    one = torch.ones(2)
    count = torch.tensor(4.0)
    # mean c̃ = (0.75, 0.25) → m̂ = 2; mean r_2 = 0.10: α_2 = 1 + 0.05·0.15 = 1.0075, α_1 exactly 1
    a = alpha_update(one, torch.tensor([3.0, 1.0]), torch.tensor([0.0, 0.4]), count, 0.05)
    assert a.tolist() == pytest.approx([1.0, 1.0075], abs=1e-7) and float(a[0]) == 1.0
    assert alpha_update(one, torch.tensor([3.0, 1.0]), torch.tensor([0.0, 0.4]), count, 0.05, "sign").tolist() == \
        pytest.approx([1.0, 1.05])
    # the weak modality follows the order: swapped inputs raise α_1
    assert alpha_update(one, torch.tensor([1.0, 3.0]), torch.tensor([0.4, 0.0]), count, 0.05).tolist() == \
        pytest.approx([1.0075, 1.0], abs=1e-7)
    # Δ < 0 at α = 1 keeps 1; a raised α of a modality that is no longer the weakest falls back to 1
    assert alpha_update(one, torch.tensor([3.0, 1.0]), torch.tensor([0.0, 2.0]), count, 0.05).tolist() == [1.0, 1.0]
    assert alpha_update(torch.tensor([1.3, 1.0]), torch.tensor([3.0, 1.0]), torch.tensor([0.0, 0.4]), count,
                        0.05).tolist() == pytest.approx([1.0, 1.0075], abs=1e-7)
    # no misaligned row: unchanged
    assert alpha_update(torch.tensor([1.3, 1.0]), torch.zeros(2), torch.zeros(2), torch.tensor(0.0), 0.05).tolist() == \
        pytest.approx([1.3, 1.0])


def test_pairing_draws_other_labels_and_skips_one_class_batches():
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 1, 2, 2, 1, 0, 3])
    for _ in range(50):
        src, anchor, valid = draw_sources(y, 2, g)
        assert src.shape == (16, 2) and bool(valid.all())
        assert bool((y[src[:, 0]] != y[src[:, 1]]).all())
        assert torch.equal(src[:8, 0], torch.arange(8)) and torch.equal(src[8:, 1], torch.arange(8))  # both directions
        assert torch.equal(src[:8, 1], src[8:, 0])
    src, anchor, valid = draw_sources(y, 3, g, n_mis=2)
    assert src.shape == (16, 3) and bool(valid.all())
    assert bool((src == anchor[:, None]).any(1).all())  # the anchor keeps one modality
    _, _, valid = draw_sources(torch.zeros(8, dtype=torch.long), 2, g)
    assert not bool(valid.any())
    src, _, valid = draw_sources(y, 2, g, "shuffle_mask")
    assert torch.equal(valid, y[src[:, 0]] != y[src[:, 1]])


# ---------------------------------------------------------------- inside a step
def toy(tmp_path, name="run", **extra):
    sets = {"dataset.n_modalities": 2, "dataset.num_classes": 3, "dataset.n_samples": 80, "train.batch_size": 8,
            "model.enc_hidden": 8, "model.enc_out": 8, **FAST, **extra}
    return build_trainer("midas", "synthetic", run_dir=tmp_path / name, epochs=4, sets=sets)


def inject(monkeypatch, meth, src, anchor, valid):
    monkeypatch.setattr(meth, "draw", lambda ctx, y: (src, anchor, valid))


def test_step_loss_by_hand_with_detached_targets(tmp_path, monkeypatch):
    """L = CE(o, y) + Σ_m CE(g_m, y) + λ·mean_rows h·CE(p̃, Σ_m α_m·c̃^m·e_{y(m)}), written out by hand from
    the model's parts; c̃, h and r are constants, so the unimodal heads' gradients are those of U alone."""
    tr = toy(tmp_path, lam=2.0)
    ctx, meth, model = tr.ctx, tr.method, tr.ctx.raw_model
    ctx.epoch, ctx.epochs_in_phase = 1, 4
    batch = first_batch(tr)
    y = batch["label"]
    B = len(y)
    j = torch.tensor([(k + 1) % B for k in range(B)])
    j = torch.where(y[j] == y, torch.tensor([(k + 2) % B for k in range(B)]), j)
    i = torch.arange(B)
    src = torch.cat([torch.stack([i, j], 1), torch.stack([j, i], 1)])
    anchor = torch.cat([i, i])
    valid = y[src[:, 0]] != y[src[:, 1]]
    inject(monkeypatch, meth, src, anchor, valid)
    meth.alpha = torch.tensor([1.0, 1.3])  # the loss of this step uses the pre-update α
    model.zero_grad(set_to_none=True)
    heads = ctx.modules["midas_heads"]
    out = meth.training_step(ctx, batch)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in list(model.named_parameters()) + list(heads.named_parameters())}
    # by hand
    m1, m2 = ctx.modalities
    model.zero_grad(set_to_none=True)
    heads.zero_grad(set_to_none=True)
    z = {m: model.encoders[m](batch[m]) for m in (m1, m2)}
    W, b = model.head.weight, model.head.bias
    hd = heads.heads
    u = {m: hd[m](z[m]) for m in (m1, m2)}
    U = F.cross_entropy(u[m1], y) + F.cross_entropy(u[m2], y)
    o = torch.cat([z[m1], z[m2]], 1) @ W.t() + b
    with torch.no_grad():
        a = {m: u[m].softmax(1)[i, y] for m in (m1, m2)}
        rows = []
        for k in range(len(src)):
            s1, s2 = int(src[k, 0]), int(src[k, 1])
            c1 = a[m1][s1] / (a[m1][s1] + a[m2][s2])
            rep = m2 if k < B else m1  # the replaced modality
            cos = F.cosine_similarity(z[rep][int(anchor[k])], z[rep][s2 if k < B else s1], dim=0)
            rows.append((s1, s2, float(c1), 1 + (float(cos) + 1) / 2))
    mis = []
    for s1, s2, c1, h in rows:
        logp = (torch.cat([z[m1][s1], z[m2][s2]]) @ W.t() + b).log_softmax(0)
        mis.append(-h * (1.0 * c1 * logp[y[s1]] + 1.3 * (1 - c1) * logp[y[s2]]))
    w = valid.float()
    L_mis = (torch.stack(mis) * w).sum() / w.sum()
    hand = F.cross_entropy(o, y) + U + 2.0 * L_mis
    assert torch.allclose(out.loss, hand, atol=1e-5)
    hand.backward()
    for n, p in list(model.named_parameters()) + list(heads.named_parameters()):
        assert torch.allclose(got[n], p.grad, atol=1e-5), n
    # the unimodal heads learn from U alone
    heads.zero_grad(set_to_none=True)
    gu = torch.autograd.grad(F.cross_entropy(hd[m1](z[m1].detach()), y) + F.cross_entropy(hd[m2](z[m2].detach()), y),
                             list(hd.parameters()))
    for (n, _), g in zip(hd.named_parameters(), gu):
        assert torch.allclose(got[f"heads.{n}"], g, atol=1e-6), n
    assert float(meth.alpha[0]) == 1.0 or float(meth.alpha[1]) == 1.0  # only the weakest may stay above 1


def test_warmup_trains_encoders_and_unimodal_heads_only(tmp_path):
    tr = toy(tmp_path)
    ctx, meth, model = tr.ctx, tr.method, tr.ctx.raw_model
    ctx.epoch, ctx.epochs_in_phase = 0, 10
    assert meth.warmup(ctx) == 1
    batch = first_batch(tr)
    out = meth.training_step(ctx, batch)
    heads = ctx.modules["midas_heads"].heads
    y = batch["label"]
    with torch.no_grad():
        hand = sum(F.cross_entropy(heads[m](model.encoders[m](batch[m])), y) for m in ctx.modalities)
    assert torch.allclose(out.loss, hand, atol=1e-6)
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    assert model.head.weight.grad is None and model.head.bias.grad is None
    ctx.epoch = 1
    assert meth.training_step(ctx, batch).loss > out.loss  # the main loss adds CE and the misaligned term


def test_feature_swap_equals_input_swap_on_a_late_fusion_model(tmp_path, monkeypatch):
    """On a concat model in eval mode, swapping encoder outputs equals re-encoding swapped inputs."""
    logits = {}
    for level in ("feature", "input"):
        tr = toy(tmp_path, name=level, swap_level=level)
        ctx, meth = tr.ctx, tr.method
        ctx.epoch, ctx.epochs_in_phase = 2, 4
        ctx.raw_model.eval()
        batch = first_batch(tr)
        src = torch.tensor([[0, 3], [5, 1], [2, 2]])
        inject(monkeypatch, meth, src, torch.tensor([0, 1, 2]), torch.tensor([True, True, False]))
        meth.training_step(ctx, batch)
        logits[level] = meth.last["logits_mis"]
    assert torch.allclose(logits["feature"], logits["input"], atol=1e-6)


def test_predict_is_the_fused_output_and_alpha_resets_per_epoch(tmp_path):
    tr = toy(tmp_path)
    ctx, meth = tr.ctx, tr.method
    batch = first_batch(tr)
    meth.alpha = torch.tensor([1.0, 7.0])
    assert torch.equal(meth.predict(ctx, batch), ctx.forward(batch).logits)
    meth.on_epoch_start(ctx)
    assert meth.alpha.tolist() == [1.0, 1.0]
    tr2 = toy(tmp_path, name="never", alpha_reset="never")
    tr2.method.alpha = torch.tensor([1.0, 7.0])
    tr2.method.on_epoch_start(tr2.ctx)
    assert tr2.method.alpha.tolist() == [1.0, 7.0]


def test_one_class_batch_is_finite_and_logged(tmp_path):
    tr = toy(tmp_path)
    ctx, meth = tr.ctx, tr.method
    ctx.epoch, ctx.epochs_in_phase = 2, 4
    batch = first_batch(tr)
    batch = {**batch, "label": torch.zeros_like(batch["label"])}
    out = meth.training_step(ctx, batch)
    assert torch.isfinite(out.loss) and float(out.logs["midas/skipped"]) == 1.0
    assert float(out.logs["midas/loss_mis"]) == 0.0


def test_mmtm_needs_input_swaps(tmp_path):
    from mmbalance.errors import MethodNotApplicable

    with pytest.raises(MethodNotApplicable, match="swap_level=input"):
        toy(tmp_path, **{"model.name": "mlp_mmtm"})


def test_alpha_and_step_counter_are_checkpointed(tmp_path):
    tr = toy(tmp_path, alpha_reset="never")
    tr.method.alpha, tr.method.t = torch.tensor([1.0, 1.3]), 5
    state = tr.method.state_dict()
    fresh = toy(tmp_path, name="fresh", alpha_reset="never")
    fresh.method.load_state_dict(state)
    assert fresh.method._alpha(fresh.ctx).tolist() == pytest.approx([1.0, 1.3]) and fresh.method.t == 5


def test_resume_gives_the_same_final_numbers(kill_and_resume):
    """On the planted-imbalance synthetic data α leaves 1 in the first epoch; killed after it and resumed
    (``alpha_reset=never``), the run must continue from the saved α."""
    sets = {**FAST, "dataset.n_samples": 300, "train.batch_size": 32, "warmup_epochs": 0, "alpha_reset": "never"}
    (full_dir, full), (code, _, resumed) = kill_and_resume("midas", sets=sets, epochs=3, stop_after=1,
                                                           dataset="synthetic")
    assert code == 0 and resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert resumed["method_metrics"] == full["method_metrics"]
    first = json.loads((full_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert any(v > 1.0 for k, v in first.items() if k.startswith("method/alpha_"))  # α moved before the kill
