"""The engine's perturb/recompute/restore capability (mmbalance/sam.py) used by a method other than MASAM:
plain SAM (Foret et al., ICLR 2021) written on ``ctx.synced_grads``, ``ctx.perturb`` and
``ctx.frozen_norm_stats`` in a few lines, checked against a hand-written SAM step."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from conftest import SMALL_MFEAT

from mmbalance.interface import BalancingMethod, StepOutput
from mmbalance.testing import build_trainer, first_batch

RHO = 0.05


class PlainSAM(BalancingMethod):
    """ε = ρ·g/‖g‖ over every trainable parameter; descend with ∇L(θ + ε)."""

    def training_step(self, ctx, batch):
        params = [p for p in ctx.raw_model.parameters() if p.requires_grad]
        loss = ctx.task.loss(ctx.forward(batch).logits, batch["label"])
        g, _ = ctx.synced_grads(loss, params)
        norm = torch.stack(torch._foreach_norm(g)).norm()
        self.handle = ctx.perturb(params, [RHO * t / (norm + 1e-12) for t in g])
        with ctx.frozen_norm_stats():
            out = ctx.forward(batch)
        return StepOutput(ctx.task.loss(out.logits, batch["label"]), out)

    def after_backward(self, ctx):
        self.handle.restore()


def test_plain_sam_on_the_capability_equals_a_hand_written_sam_step(tmp_path):
    sets = {**SMALL_MFEAT, "train.max_steps_per_epoch": 1, "train.momentum": 0.0, "train.weight_decay": 0.0,
            "train.modality_eval": "none", "train.diagnostics": "none"}
    tr = build_trainer("baseline", "mfeat", run_dir=tmp_path / "r", epochs=1, sets=sets)
    tr.method.__class__ = PlainSAM
    batch = first_batch(tr)
    ref = copy.deepcopy(tr.ctx.raw_model)
    params = list(ref.parameters())
    y = batch["label"]
    g = torch.autograd.grad(F.cross_entropy(ref({m: batch[m] for m in tr.ctx.modalities}).logits, y), params)
    norm = torch.sqrt(sum((t * t).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(params, g):
            p.add_(RHO * t / (norm + 1e-12))
    g2 = torch.autograd.grad(F.cross_entropy(ref({m: batch[m] for m in tr.ctx.modalities}).logits, y), params)
    with torch.no_grad():
        for p, t in zip(params, g):
            p.sub_(RHO * t / (norm + 1e-12))
    want = [p.detach() - tr.cfg.lr * t for p, t in zip(params, g2)]
    tr.fit()
    for p, w in zip(tr.ctx.raw_model.parameters(), want):
        assert torch.allclose(p, w, atol=1e-6)
    assert not tr.ctx.perturbations.active
