"""Bug classes, checked for EVERY registered method at once (a new method is covered the day it is registered):

* train vs eval mode: with a model that has dropout and batch norm, no forward of the run's model outside the
  engine's training steps (probes, prototypes, held-out metrics, re-learning diagnosis, epoch plans,
  diagnostics) runs in train mode — it would change the batch-norm statistics and see dropout noise — and
  every training step starts with the whole model back in train mode;
* randomness sources: a method draws its randomness from its own seeded generator (``ctx.generator``), never
  from the global torch / NumPy / Python RNG, which other code (dropout, data libraries) also consumes.
* evaluation: with an eval batch that divides neither split, every sample is scored exactly once by every
  method's prediction path (full model, each modality alone, the DataLoader path).
* prediction paths: a method with its own ``predict`` returns its documented combination (by hand from the
  model's parts, on inputs where a wrong one differs), or names the test of its own file that checks it.
* state at epoch boundaries: an epoch's metrics and edited gradients do not depend on the epochs before it,
  except the state a method carries over by design (``CARRIES_OVER``); after an epoch window nothing of the
  window is left over (``WINDOWS``).
* gradient flow: a loss term's gradient reaches exactly the parameter groups the method's equations name
  (``GRADIENT_FLOW``: a missing or an extra detach fails).
* guards and clips: a guard on a magnitude (not a sign), a one-sided cap, on hand-built inputs.
* sub-steps: the k-th sub-step trains the k-th modality's encoder and no other.
* stages: every optimizer step of a method with stages (engine phases: ReconBoost, UME; Greedy's normal and
  re-balancing steps; UMT's teachers then student) updates exactly the parameters its stage trains, and the
  models handed from one stage to the next are the ones the first stage trained.
* units and sources: statistics on segmentation outputs have their documented unit (hand loops over the
  pixels: OGM-GE, ARL, MLA, ReconBoost, AGM, LFM, MBSD, AUG per pixel; MSLR's and CGGM's per-slice Dice); a per-modality running statistic is fed its own modality's values (AGM's S̄,
  Greedy's gate averages, MASAM's loss EMA, QMF's loss history, MSLR's metric memory, PMR's prototypes).
* auxiliary losses: one step's loss is the fused loss plus the per-modality terms combined by hand as
  documented (sum vs mean over modalities, per-modality weights in modality order: every method that computes
  unimodal losses, CGGM, UMT, G-Blending);
  per-modality hyperparameter lists apply in dataset order (every list-of-numbers hyperparameter is listed).

Each method trains one short epoch on a small mfeat; presets of the same class share its code paths and are
represented by one of them."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from conftest import SMALL_MFEAT
from torch import nn

from mmbalance.engine import Trainer
from mmbalance.registry import METHODS, list_methods
from mmbalance.testing import build_trainer

SETS = {**SMALL_MFEAT, "dataset.views": "[fac,fou]", "train.modality_eval": "none", "train.diagnostics": "none",
        "train.max_steps_per_epoch": 2}
#: methods whose set-up or feature passes need more than one epoch
EPOCHS = {"reconboost": 2, "relearning": 3}
#: settings that make a method's feature passes and random draws happen within the short run
METHOD_SETS = {"relearning": {"reinit_every": 1}, "remix": {"warmup_epochs": 0, "group_order": "interleaved"},
               "smv": {"warmup_epochs": 0},
               "smv_modality": {"warmup_epochs": 0, "alpha": 2.0}, "opm": {"warmup_epochs": 0}}
#: presets with code paths of their own (a held-out pass, a random pick) besides one name per class
EXTRA = ["lfm_learnable", "greedy_random"]


def one_per_class() -> list[str]:
    """The base name of every method class (a preset where the class has no plain name), plus :data:`EXTRA`."""
    seen: dict[type, str] = {}
    for name in list_methods():
        factory = METHODS.get(name).factory
        if getattr(factory, "accepts_name_argument", False):
            continue
        if name == getattr(factory, "name", None) or factory not in seen:
            seen[factory] = name
    return sorted(set(seen.values()) | set(EXTRA))


def _trainer(name: str, tmp_path, sets=None) -> Trainer:
    return build_trainer(name, "mfeat", run_dir=tmp_path / name, epochs=EPOCHS.get(name, 1),
                         output_dir=tmp_path / "shared", sets={**SETS, **METHOD_SETS.get(name, {}), **(sets or {})})


@pytest.fixture
def bn_dropout_encoders(monkeypatch):
    """mfeat's MLP encoders with batch norm and dropout: Linear → BatchNorm1d → ReLU → Dropout(0.3) → Linear → ReLU."""
    import mmbalance.models.encoders as enc

    def init(self, in_dim, hidden=128, out_dim=64, dropout=0.0):
        nn.Sequential.__init__(self, nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.3),
                               nn.Linear(hidden, out_dim), nn.ReLU())
        self.out_dim = out_dim

    monkeypatch.setattr(enc.MLPEncoder, "__init__", init)


def test_feature_passes_run_in_eval_mode_and_nothing_reads_test_before_the_final_evaluation(
        tmp_path, monkeypatch, bn_dropout_encoders):
    """Invariants of one short run per method. Mode: no forward of the run's model outside the engine's
    training steps runs in train mode, and every training step starts with the whole model in train mode.
    Frozen members (teachers): in eval mode during training, weights and batch-norm statistics unchanged.
    Test split: nothing — a method, a teacher's training, a selection — reads the test split before the final
    evaluation (``Trainer._finish``, the teachers' own included)."""
    from mmbalance.data import TensorSplit

    in_steps, in_finish = [0], [0]

    def counting(counter, real):
        def wrapper(self, *a, **k):
            counter[0] += 1
            try:
                return real(self, *a, **k)
            finally:
                counter[0] -= 1
        return wrapper

    monkeypatch.setattr(Trainer, "_train_steps", counting(in_steps, Trainer._train_steps))
    monkeypatch.setattr(Trainer, "_finish", counting(in_finish, Trainer._finish))
    problems: list[str] = []
    current = [""]

    class WatchedSplit(TensorSplit):
        def __getattribute__(self, attr):
            if attr in ("inputs", "labels", "batch", "subset") and not in_finish[0]:
                problems.append(f"{current[0]}: the test split is read ({attr}) before the final evaluation")
            return super().__getattribute__(attr)

    real_eval_batches = Trainer._eval_batches

    def eval_batches(self, split, *a, **k):
        if isinstance(split, WatchedSplit) and not in_finish[0]:
            problems.append(f"{current[0]}: the test split is evaluated before the final evaluation")
        return real_eval_batches(self, split, *a, **k)

    monkeypatch.setattr(Trainer, "_eval_batches", eval_batches)
    for name in one_per_class():
        current[0] = name
        tr = _trainer(name, tmp_path)
        assert type(tr.data.test) is TensorSplit
        tr.data.test.__class__ = WatchedSplit
        model = tr.ctx.raw_model
        own = {id(m) for m in model.modules() if isinstance(m, nn.BatchNorm1d)}
        assert own, "the test model has no batch norm"

        def hook(mod, inp, name=name, own=own):  # copies (G-Blending's sub-networks) carry the hook, not the model
            if id(mod) in own and mod.training and not in_steps[0]:
                problems.append(f"{name}: a forward of the model outside the training steps runs in train mode")

        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.register_forward_pre_hook(hook)
        # frozen members (teachers: add_module(trainable=False)): identical weights AND batch-norm statistics
        frozen = {k: {n: t.clone() for n, t in ex.module.state_dict().items()}
                  for k, ex in tr.ctx.extra.items() if not ex.trainable}
        meth = tr.method
        for hook_name in ("training_step", "training_substeps"):
            original = getattr(meth, hook_name)

            def entry(ctx, batch, original=original, name=name):
                off = [n for n, m in ctx.raw_model.named_modules()
                       if isinstance(m, (nn.BatchNorm1d, nn.Dropout)) and not m.training]
                if off:
                    problems.append(f"{name}: a training step starts with {off[:2]} in eval mode")
                on = [k for k, ex in ctx.extra.items() if not ex.trainable and ex.module.training]
                if on:
                    problems.append(f"{name}: frozen member(s) {on[:2]} in train mode during a training step")
                return original(ctx, batch)

            setattr(meth, hook_name, entry)
        tr.fit()
        tr.data.test.__class__ = TensorSplit
        for k, before in frozen.items():
            after = tr.ctx.extra[k].module.state_dict()
            moved = [n for n, t in before.items() if not torch.equal(t, after[n])]
            if moved:
                problems.append(f"{name}: frozen member {k} changed during training ({moved[:2]})")
    assert not problems, "\n".join(sorted(set(problems)))


def test_methods_draw_randomness_from_their_generator_not_the_global_rngs(tmp_path):
    problems: list[str] = []
    for name in one_per_class():
        tr = _trainer(name, tmp_path)  # mfeat's model has no dropout: nothing else draws during an epoch
        meth, seen = tr.method, {}
        start, end = meth.on_epoch_start, meth.on_epoch_end

        def on_start(ctx, start=start, seen=seen):
            seen.update(torch=torch.get_rng_state().clone(), np=np.random.get_state()[1].copy(), py=random.getstate())
            return start(ctx)

        def on_end(ctx, end=end, name=name, seen=seen):
            out = end(ctx)
            drawn = [k for k, same in (("torch", torch.equal(seen["torch"], torch.get_rng_state())),
                                       ("numpy", np.array_equal(seen["np"], np.random.get_state()[1])),
                                       ("random", seen["py"] == random.getstate())) if not same]
            if drawn:
                problems.append(f"{name}: the epoch drew from the global {', '.join(drawn)} RNG")
            return out

        meth.on_epoch_start, meth.on_epoch_end = on_start, on_end
        tr.fit()
    assert not problems, "\n".join(problems)


#: Every preset's bound values, from its method page (docs/methods/<method>.md) and the paper or code it
#: reproduces. A new preset must be added here: the test fails for a preset it does not know.
PRESETS = {
    "amco_bb": ("amco", {"mask_target": "logit"}),
    "masam_static": ("masam", {"mode": "static"}),
    "aug_released": ("aug", {"train_added": False}),
    "g2d_no_smp": ("g2d", {"smp": False}),
    "arl_released": ("arl", {"weights": "fixed_half"}),
    "cggm_paper": ("cggm", {"cos_source": "grads_same_step", "rho_in_b": True}),
    "gblending_offline": ("gblending", {"mode": "offline"}),
    "gblending_offline_robust": ("gblending", {"mode": "offline", "noise_floor": True}),
    "greedy_random": ("greedy", {"mode": "random"}),
    "greedy_vanilla": ("greedy", {"epsilon": float("inf")}),
    "inforeg_official": ("inforeg", {"constants": "fixed"}),
    "lfm_learnable": ("lfm", {"schedule": "learned"}),
    "mla_alternate": ("mla", {"schedule": "alternate"}),
    "mla_released": ("mla", {"head_projection": False}),
    "mslr_grad_scale": ("mslr", {"form": "grad_scale"}),
    "multitask_strong": ("multitask", {"gamma": 4.0}),
    "ogm": ("ogm_ge", {"ge": False}),
    "pmr_paper": ("pmr", {"coef_rule": "smooth"}),
    "qmf_rgbd": ("qmf", {"detach_w": False, "lambda_rank": 0.1, "history_update": "after"}),
    "reconboost_official_schedule": ("reconboost", {"e1": 4, "e2": 4, "optimizer": "official"}),
    "reconboost_pretrained": ("reconboost", {"init_from_unimodal": True}),
}


def test_every_preset_binds_exactly_its_documented_values():
    """A preset is its base method with some values bound: those values, and every other hyperparameter at
    the base method's default (a preset that binds a wrong value, an extra one, or a misspelt key fails)."""
    from conftest import REPO

    from mmbalance.config import to_jsonable
    from mmbalance.registry import create_method

    presets = {n for n in list_methods() if METHODS.get(n).defaults and METHODS.get(n).factory.name != n}
    assert presets == set(PRESETS), f"presets without an expectation here: {sorted(presets - set(PRESETS))}"
    for name, (base, bound) in PRESETS.items():
        assert issubclass(METHODS.get(name).factory, METHODS.get(base).factory), name
        got, ref = to_jsonable(create_method(name).hp), to_jsonable(create_method(base).hp)
        assert {k: got[k] for k in bound} == to_jsonable(bound), name
        assert {k: v for k, v in got.items() if k not in bound} == {k: v for k, v in ref.items() if k not in bound}, name
        assert f"`{name}`" in (REPO / "docs" / "methods" / f"{base}.md").read_text(), f"{name} is not on {base}'s page"


def test_teacher_cache_key_changes_with_everything_that_changes_the_teacher():
    """The ``<m>-only`` teacher cache is shared between runs (UMT, UME, ReconBoost's pretrained start): its key
    must differ whenever the teacher would — the seed, a training setting, a dataset option, the model, the
    modality — and be equal for the same configuration (else runs share a wrong teacher, or retrain it)."""
    import dataclasses

    from mmbalance.config import RunConfig
    from mmbalance.registry import create_dataset
    from mmbalance.teachers import teacher_key

    data = create_dataset("mfeat", None, limit_per_class=20)
    base = RunConfig(method="umt", dataset="mfeat", seed=0, train={"epochs": 3, "lr": 0.01},
                     dataset_options={"limit_per_class": 20}, model={})
    key = teacher_key(data, base, "fac")
    assert teacher_key(data, dataclasses.replace(base, method="ume", output_dir="elsewhere"), "fac") == key
    changed = {"seed": dataclasses.replace(base, seed=1),
               "train": dataclasses.replace(base, train={"epochs": 3, "lr": 0.02}),
               "dataset": dataclasses.replace(base, dataset_options={"limit_per_class": 21}),
               "model": dataclasses.replace(base, model={"dropout": 0.1})}
    for what, cfg in changed.items():
        assert teacher_key(data, cfg, "fac") != key, f"the teacher cache key ignores the {what}"
    assert teacher_key(data, base, "fou") != key


def test_gradient_edits_see_unscaled_gradients_under_fp16(tmp_path):
    """``after_backward`` (every method's gradient edits: scaling, clipping, projections) must see the true
    gradients: under fp16 they are unscaled before the hook, exactly once. A loss scale of 1024 emulated on
    CPU; the norms the hook sees must equal the float32 run's, not 1024× (or 1/1024×) them."""
    from mmbalance.methods.baseline import Baseline
    from test_precision import SCALE, emulate_fp16

    class Recording(Baseline):
        def after_backward(self, ctx):
            self.seen.append(float(torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in ctx.raw_model.parameters() if p.grad is not None]))))

    sets = {**SMALL_MFEAT, "train.max_steps_per_epoch": 3, "train.modality_eval": "none", "train.diagnostics": "none"}
    seen = {}
    for mode in ("fp32", "fp16"):
        tr = build_trainer("baseline", run_dir=tmp_path / mode, epochs=1, sets=sets)
        tr.method.__class__ = Recording
        tr.method.seen = []
        if mode == "fp16":
            emulate_fp16(tr, torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000))
        tr.fit()
        seen[mode] = tr.method.seen
    assert len(seen["fp32"]) == 3
    torch.testing.assert_close(torch.tensor(seen["fp16"]), torch.tensor(seen["fp32"]), rtol=1e-4, atol=0)


#: an evaluation batch size that divides neither mfeat's small validation (20) nor test (40) split
ODD_EVAL_BATCH = 7


def _whole_split_oracle(tr: Trainer, split, absent: tuple[str, ...] = ()) -> dict[str, float]:
    """Accuracy and loss of ``split`` by hand: the method's prediction for all its samples in ONE batch
    (no batching to drop or repeat a sample), scored with plain torch."""
    import torch.nn.functional as F

    n = len(split)
    batch = split.batch(torch.arange(n))
    tr._eval_mode(True)
    try:
        with torch.no_grad():
            logits = tr.method.predict(tr.ctx, batch, absent).float()
    finally:
        tr._eval_mode(False)
    assert logits.shape[0] == n, f"predict returned {logits.shape[0]} rows for {n} samples"
    y = split.labels.long()
    return {"accuracy": float((logits.argmax(dim=-1) == y).double().mean()),
            "loss": float(F.cross_entropy(logits, y))}


class _MapSplit(torch.utils.data.Dataset):
    """A split served item by item (the DataLoader evaluation path of image and volume datasets)."""

    def __init__(self, split) -> None:
        self.split, self.labels = split, split.labels

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.split.batch(torch.tensor([i])).items()}

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.split.batch(idx)


def test_evaluation_scores_every_sample_once_when_the_eval_batch_does_not_divide_the_split(tmp_path, monkeypatch):
    """Evaluation (every method's predict path, the per-modality passes, and the DataLoader path): with an
    eval batch that divides neither split, each sample is scored exactly once — the metric meters see exactly
    the split's label counts (a hand count), and accuracy and loss equal a one-batch prediction of the whole
    split scored by hand. A dropped last partial batch, a repeated padding row or labels misaligned with
    predictions fail."""
    from mmbalance.tasks import ClassificationTask

    meters: list = []
    real_new_meter = ClassificationTask.new_meter

    def new_meter(self):
        meters.append(real_new_meter(self))
        return meters[-1]

    monkeypatch.setattr(ClassificationTask, "new_meter", new_meter)
    problems: list[str] = []

    def check(name, what, split, got):
        counts = torch.bincount(split.labels.long(), minlength=meters[0].k)
        for meter in meters:  # every meter the evaluation filled (the full model's, each modality's)
            if meter.n != len(split) or not torch.equal(meter.confusion.sum(dim=1), counts):
                problems.append(f"{name}: {what} scored {meter.n} samples (per class "
                                f"{meter.confusion.sum(dim=1).tolist()}) of a split of {len(split)} ({counts.tolist()})")
        meters.clear()
        for key, (metrics, absent) in got.items():
            for k, v in _whole_split_oracle(tr, split, absent).items():
                if abs(metrics[k] - v) > 1e-4 * max(1.0, abs(v)):
                    problems.append(f"{name}: {what} {key} {k} = {metrics[k]:.6f}, by hand over the whole split {v:.6f}")

    for name in one_per_class():
        tr = _trainer(name, tmp_path, sets={"train.eval_batch_size": ODD_EVAL_BATCH})
        tr.fit()
        mods = tr.ctx.modalities
        alone = {m: tuple(o for o in mods if o != m) for m in mods}
        for split_name in ("val", "test"):
            split = getattr(tr.data, split_name)
            assert len(split) % ODD_EVAL_BATCH, "the eval batch divides the split: nothing to check"
            meters.clear()
            check(name, split_name, split, {"full": (tr.evaluate(split), ())})
            full, per_mod = tr.evaluate_with_modalities(split)
            check(name, f"{split_name} with modalities", split,
                  {"full": (full, ()), **{f"{m} alone": (per_mod[m], alone[m]) for m in mods}})
        if name == "baseline":  # the DataLoader path (one method: it does not depend on the method)
            split = _MapSplit(tr.data.val)
            meters.clear()
            check(name, "val through a DataLoader", split, {"full": (tr.evaluate(split), ())})
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------ prediction paths
def _hand_qmf(tr, batch, absent):
    """QMF: Σ_m max(0, LSE(o_m)/10)·o_m over the present modalities (clamped training confidences)."""
    enc, heads = tr.ctx.raw_model.encoders, tr.ctx.modules["qmf_heads"].heads
    out = 0
    for m in tr.ctx.modalities:
        if m not in absent:
            o = heads[m](enc[m](batch[m]))
            out = out + (torch.logsumexp(o, dim=1) / 10.0).clamp_min(0)[:, None] * o
    return out


def _hand_aug(tr, batch, absent):
    """AUG: Σ_m α_m·F_m / Σ_m α_m over the present modalities."""
    enc, heads, alpha = tr.ctx.raw_model.encoders, tr.ctx.modules["aug_heads"], tr.method.alpha
    present = [m for m in tr.ctx.modalities if m not in absent]
    return sum(alpha[m] * heads(m, enc[m](batch[m]))[0] for m in present) / sum(alpha[m] for m in present)


def _hand_mla(tr, batch, absent):
    """MLA (dynamic fusion, per sample): Σ_m softmax_m(−H(p_m))·o_m with o_m the shared head on z_m."""
    enc, head = tr.ctx.raw_model.encoders, tr.ctx.modules["mla_head"]
    outs = [head.out(enc[m](batch[m])) for m in tr.ctx.modalities if m not in absent]
    if len(outs) == 1:
        return outs[0]
    ent = torch.stack([-(o.softmax(1) * o.log_softmax(1)).sum(1) for o in outs])
    w = torch.exp(-ent) / torch.exp(-ent).sum(0)
    return sum(w[k][:, None] * o for k, o in enumerate(outs))


def _hand_reconboost(tr, batch, absent):
    """ReconBoost: β·Σ_m H(φ_m(x_m)), an absent modality's input zeroed."""
    model = tr.ctx.raw_model
    return model.beta * sum(model.head(model.encoders[m](torch.zeros_like(batch[m]) if m in absent else batch[m]))
                            for m in tr.ctx.modalities)


def _skew_qmf(tr, batch):
    """Modality 0's head biased to −200: its energy confidence is negative (clamped to 0, unclamped it inverts)."""
    head = tr.ctx.modules["qmf_heads"].heads[tr.ctx.modalities[0]]
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    last.bias.data -= 200.0


def _skew_aug(tr, batch):
    a, b = tr.ctx.modalities
    tr.method.alpha = {a: 3.0, b: 1.0}


def _skew_mla(tr, batch):
    batch[tr.ctx.modalities[0]] *= 8.0  # sharper logits for modality 0: unequal entropies, unequal weights


def _skew_reconboost(tr, batch):
    tr.ctx.raw_model.beta.data.fill_(0.37)


#: For each method whose ``predict`` is its own, the documented combination by hand from the model's parts,
#: and how to make the inputs or state such that a wrong combination shows (a negative QMF confidence, unequal
#: AUG weights, unequal MLA entropies, β ≠ 1).
PREDICT_BY_HAND = {"qmf": (_hand_qmf, _skew_qmf), "aug": (_hand_aug, _skew_aug), "mla": (_hand_mla, _skew_mla),
                   "reconboost": (_hand_reconboost, _skew_reconboost)}
#: the other methods with their own ``predict``: the test (in the method's own file) that checks its combination
PREDICT_TESTED_ELSEWHERE = {
    "amco": "tests/test_amco.py::test_logit_variant_masks_classes_and_predicts_through_the_star_layer",
    "greedy": "tests/test_greedy.py::test_prediction_gates_normally_even_mid_rebalancing",
    "lfm": "tests/test_lfm.py::test_predict_is_the_mean_of_the_unimodal_outputs",
    "mmcosine": "tests/test_mmcosine.py::test_shared_head_bias_is_frozen_ignored_and_slices_are_the_column_blocks",
    "ume": "tests/test_ume_umt.py::test_ume_output_is_mean_of_unimodal_outputs_all_tasks",
}


def test_every_own_predict_has_a_hand_check():
    """A method with its own ``predict`` is checked against its documented combination: here
    (:data:`PREDICT_BY_HAND`) or by a named test in its own file that exists."""
    from conftest import REPO

    from mmbalance.interface import BalancingMethod

    own = {METHODS.get(n).factory.name for n in list_methods()
           if METHODS.get(n).factory.predict is not BalancingMethod.predict}
    assert own == set(PREDICT_BY_HAND) | set(PREDICT_TESTED_ELSEWHERE), "own predict without a hand check"
    for node in PREDICT_TESTED_ELSEWHERE.values():
        path, func = node.split("::")
        assert f"def {func}(" in (REPO / path).read_text(), node


@pytest.mark.parametrize("name", sorted(PREDICT_BY_HAND))
def test_predict_is_the_documented_combination_by_hand(tmp_path, name):
    """``predict`` (full, and each modality alone) equals the method's documented combination computed by
    hand from the model's parts, on inputs/state where the plausible wrong combinations differ from it."""
    hand, skew = PREDICT_BY_HAND[name]
    tr = _trainer(name, tmp_path)
    batch = tr.data.val.batch(torch.arange(12))
    skew(tr, batch)
    mods = tr.ctx.modalities
    tr._eval_mode(True)
    with torch.no_grad():
        for absent in [(), *((o,) for o in mods)]:
            torch.testing.assert_close(tr.method.predict(tr.ctx, batch, absent).float(), hand(tr, batch, absent).float(),
                                       rtol=1e-5, atol=1e-5, msg=lambda m, a=absent: f"{name}, absent={a}: {m}")


# ------------------------------------------------------------------------------------------ state at epoch boundaries
#: Methods whose state carries across epochs BY DESIGN: the metrics that may differ in an epoch depending on
#: what came before ("*": all), and whether its gradients may. Everything else a method reports (timings
#: aside), and every gradient it edits, must not depend on the epochs before.
CARRIES_OVER: dict[str, tuple[set[str], bool]] = {
    "agm": ({"kappa_fac", "kappa_fou", "s_bar_fac", "s_bar_fou"}, True),  # κ from the running mean S̄
    "amco": (set(), True),  # the masking level ℓ follows the epoch
    "aug": ({"K_fac", "K_fou", "S_fac", "S_fou", "r"}, True),  # the ensembles grow across epochs
    "cggm": ({"guard_hits"}, True),  # Δε = ε − ε_prev: the previous step's accuracy across the boundary (Eq. 6)
    "gblending": ({"*"}, True),  # the blend weights come from the losses' change since the last estimate
    "greedy": ({"speed_fac", "speed_fou"}, False),  # the conditional utilisation speeds accumulate
    "greedy_random": ({"speed_fac", "speed_fou"}, False),
    "lfm": ({"alpha_cls", "alpha_align"}, True),  # the α schedule follows the epoch
    "lfm_learnable": ({"alpha_cls", "alpha_align"}, False),  # learned α: an optimizer-free update per step
    "masam": ({"A_fac", "A_fou", "d_fac", "d_fou", "ma_fac", "ma_fou"}, False),  # moving averages over steps
    "midas": ({"t", "r_mean_fac", "r_mean_fou", "c_mean_fac", "c_mean_fou"}, True),  # the curriculum's step count
    "mla": ({"substeps", "projector_trace"}, True),  # the projector accumulates over training (cumulative count)
    "pmr": ({"rho_fac", "rho_fou"}, True),  # prototype momentum (step 4); the first draws until every class
    "qmf": (set(), True),  # the per-sample loss history spans the epochs
    "reconboost": (set(), True),  # the learner alternates by epoch
    "remix": (set(), True),  # the epoch plan follows the epoch
    "smv": ({"samples_trained"}, True),  # cumulative count; the plan resamples by the last epoch's values
    "smv_modality": ({"samples_trained", "epoch_samples", "copies_fac", "copies_fou", "phi_mean_fac", "phi_mean_fou"},
                     True),  # as smv; the copies and values follow the last epoch's values
}


#: settings checked besides :func:`one_per_class` (nothing may carry over): per-epoch state the defaults do not use
EPOCH_VARIANTS = {"mslr": {"metric_split": "train_running"}}


@pytest.fixture
def frozen_epochs(tmp_path, monkeypatch):
    """``run(name, epochs, sets, first_key)`` → per epoch ``(metrics(), per-step records)``: a run in which no
    parameter moves (the optimizer step is skipped; each step's record is the edited gradients' norms and the
    groups' effective learning rates), epoch e has the batches of order key ``first_key + e`` and the method's
    generator is seeded from that key at the epoch start, so an epoch's inputs do not depend on the run."""
    from mmbalance.data import batching

    records: list[list[torch.Tensor]] = []
    offset = [0]

    def no_step(self, opts):
        groups = [g for o in opts for g in o.param_groups]
        records[-1].append(torch.cat([
            torch.stack([p.grad.float().norm() if p.grad is not None else torch.tensor(-1.0)
                         for g in groups for p in g["params"]]),
            torch.tensor([float(g["lr"]) for g in groups])]))
        return True

    monkeypatch.setattr(Trainer, "_step_optimizers", no_step)
    real_set_epoch = batching.TensorBatcher.set_epoch
    monkeypatch.setattr(batching.TensorBatcher, "set_epoch", lambda self, key: real_set_epoch(self, key + offset[0]))

    def run(name: str, epochs: int, sets: dict, first_key: int = 0) -> list[tuple[dict[str, float], list[torch.Tensor]]]:
        offset[0] = first_key
        tr = _trainer(name, tmp_path, {"train.max_steps_per_epoch": 2, "train.batch_size": 35, **sets})
        tr.cfg.epochs = epochs
        meth = tr.method
        start, end = meth.on_epoch_start, meth.on_epoch_end
        seen: list[dict[str, float]] = []

        def on_start(c, start=start):
            c.generator.manual_seed(1234 + c.epoch + offset[0])  # on the CPU also the device generator
            records.append([])
            return start(c)

        def on_end(c, end=end):
            out = end(c)
            seen.append(meth.metrics())
            return out

        meth.on_epoch_start, meth.on_epoch_end = on_start, on_end
        records.clear()
        tr.fit()
        return list(zip(seen, records))

    return run


def _same_metric(a, b) -> bool:
    return a == b or (a is not None and b is not None
                      and (math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))))


def _same_steps(g1: list[torch.Tensor], g2: list[torch.Tensor]) -> bool:
    return len(g1) == len(g2) and all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(g1, g2))


def test_an_epoch_after_another_reports_what_it_reports_as_the_first(frozen_epochs):
    """State at the epoch boundary, every method: an epoch Y must give the same ``metrics()``, edited gradients
    and learning rates at every step whether it follows another epoch X or is the run's first epoch. Nothing
    else differs: no parameter moves, Y has the same batches and the method's generator the same state in both
    runs, X has other batches. A per-epoch trace, sum or count not reset at the boundary, or a multiplier left
    over from the previous epoch, makes Y differ. Methods whose state carries over by design list what may
    differ in :data:`CARRIES_OVER`."""
    problems: list[str] = []
    for name, sets in [(n, {}) for n in one_per_class()] + list(EPOCH_VARIANTS.items()):
        two, one = frozen_epochs(name, 2, sets), frozen_epochs(name, 1, sets, first_key=1)
        if len(two) != 2 or len(one) != 1:  # not two epochs in one phase (UME: an ensemble of teachers)
            continue
        after, first = two[1], one[0]
        keys, grads_differ = CARRIES_OVER.get(name, (set(), False)) if not sets else (set(), False)
        for k in sorted(set(after[0]) | set(first[0])):
            a, b = after[0].get(k), first[0].get(k)
            if k not in keys and "*" not in keys and not k.endswith("_seconds") and not _same_metric(a, b):
                problems.append(f"{name}: metric {k} = {a} in an epoch after another, {b} in the same epoch first")
        if not grads_differ and not _same_steps(after[1], first[1]):
            problems.append(f"{name}: the edited gradients or learning rates differ between an epoch after another "
                            "and the same epoch first")
    assert not problems, "\n".join(problems)


#: Methods with an epoch window: (settings opening it for epoch 0 only, settings that never open it in 2 epochs).
#: (Not MSLR: its window is when the multipliers are updated, at the epoch end; they apply after it by design.)
WINDOWS = {
    "ogm_ge": ({"start_epoch": 0, "end_epoch": 0}, {"start_epoch": 5, "end_epoch": 5}),
    "ogm_ge/lr": ({"start_epoch": 0, "end_epoch": 0, "apply_to": "lr"}, {"start_epoch": 5, "end_epoch": 5, "apply_to": "lr"}),
    "agm": ({"start_epoch": 0, "end_epoch": 0}, {"start_epoch": 5, "end_epoch": 5}),
    "pmr": ({"start_epoch": 0, "end_epoch": 0}, {"start_epoch": 5, "end_epoch": 5}),
    "amco": ({"start": 0, "end": 0}, {"start": 5, "end": 5}),
}


@pytest.mark.parametrize("key", sorted(WINDOWS))
def test_after_its_window_a_method_trains_as_if_the_window_never_opened(frozen_epochs, key):
    """State at a window's end: in the epoch after a window of one epoch, the edited gradients and the groups'
    learning rates must be those of the same epoch in a run whose window never opens (no parameter moves,
    same batches and generator state) — a multiplier (a gradient coefficient, an ``lr_mult``) left over from
    the window makes them differ."""
    name = key.split("/")[0]
    inside, never = WINDOWS[key]
    opened, closed = frozen_epochs(name, 2, inside), frozen_epochs(name, 2, never)
    assert not _same_steps(opened[0][1], closed[0][1]), f"{key}: the window changes nothing in its epoch (no power)"
    assert _same_steps(opened[1][1], closed[1][1]), f"{key}: the epoch after the window trains differently"


# ------------------------------------------------------------------------------------------ gradient flow
def _flow_pmr(tr, batch):
    """PMR: Σ_m β_m·PCE_m reaches encoder m exactly where β_m > 0 (prototypes are constants), never the head."""
    tr.method.compute_prototypes(tr.ctx)
    out = tr.method.training_step(tr.ctx, batch)
    beta = {m: float(out.logs[f"pmr/beta_{m}"]) for m in tr.ctx.modalities}
    assert 0 < sum(b > 0 for b in beta.values()) < len(beta), f"no lagging and leading modality: {beta}"
    term = out.loss - tr.ctx.task.loss(out.output.logits, batch["label"])
    return term, {**{f"encoder/{m}": b > 0 for m, b in beta.items()}, "head.weight": False, "head.bias": False}


def _flow_cggm(tr, batch):
    """CGGM: the classifiers' loss Σ_m ℓ(f_m(sg(z_m))) trains the classifiers only, never the model."""
    out = tr.method.training_step(tr.ctx, batch)
    assert "cggm/lgm_added" not in out.logs  # first step: no direction term yet
    term = out.loss - tr.ctx.task.loss(out.output.logits, batch["label"])
    return term, {**{f"encoder/{m}": False for m in tr.ctx.modalities}, "head.weight": False, "head.bias": False,
                  "cggm_classifiers": True}


def _flow_cggm_paper(tr, batch):
    """cggm_paper: L_gm = Σ_m B_m·(1 − cos(sg(g_m), g_F,m)) (same step) reaches W_F through g_F, never the
    classifiers (their gradient g_m is a constant)."""
    tr.method.training_step(tr.ctx, batch)
    return tr.method.lgm_now, {"head.weight": True, "cggm_classifiers": False}


#: per method, a loss term and where its gradient must (True) or must not (False) go, by hand
def _dgl_terms(tr, batch) -> list[torch.Tensor]:
    """The losses DGL's step computes, in order (the task loss called on ŷ, then on each u_m), with their graphs."""
    task, seen = tr.ctx.task, []
    real = task.loss
    task.loss = lambda *a, **k: seen.append(real(*a, **k)) or seen[-1]
    try:
        tr.method.training_step(tr.ctx, batch)
    finally:
        del task.loss
    assert len(seen) == 1 + len(tr.ctx.modalities)
    return seen


def _flow_dgl(tr, batch):
    """DGL: the fused loss ℓ(h(sg z̄)) trains the fusion and the head, never the encoders."""
    return _dgl_terms(tr, batch)[0], {**{f"encoder/{m}": False for m in tr.ctx.modalities},
                                      "head.weight": True, "head.bias": True}


def _flow_dgl_unimodal(tr, batch):
    """DGL: the unimodal losses Σ_m ℓ(u_m) train the encoders through the detached shared head, never the head."""
    return sum(_dgl_terms(tr, batch)[1:]), {**{f"encoder/{m}": True for m in tr.ctx.modalities},
                                            "head.weight": False, "head.bias": False}


GRADIENT_FLOW = {"pmr": _flow_pmr, "cggm": _flow_cggm, "cggm_paper": _flow_cggm_paper, "dgl": _flow_dgl,
                 "dgl/unimodal": _flow_dgl_unimodal}


@pytest.mark.parametrize("name", sorted(GRADIENT_FLOW))
def test_each_loss_term_sends_gradient_exactly_where_the_method_says(tmp_path, name):
    """Gradient flow (a missing or an extra detach): one training step's loss term, differentiated with respect to
    each parameter group (each encoder, the head's weight and bias, each method-owned module), has a non-zero
    gradient exactly in the groups the method's equations name."""
    tr = _trainer(name.split("/")[0], tmp_path)
    ctx = tr.ctx
    batch = tr.data.train.batch(torch.arange(32))
    term, expected = GRADIENT_FLOW[name](tr, batch)
    groups = {f"encoder/{m}": list(ctx.raw_model.encoders[m].parameters()) for m in ctx.modalities}
    groups.update({"head.weight": [ctx.raw_model.head.weight], "head.bias": [ctx.raw_model.head.bias]})
    groups.update({k: list(mod.parameters()) for k, mod in ctx.modules.items() if k in expected})
    assert set(expected) <= set(groups), sorted(set(expected) - set(groups))
    params = [p for k in expected for p in groups[k]]
    grads = iter(torch.autograd.grad(term, params, allow_unused=True, retain_graph=True))
    got = {k: any(g is not None and bool(g.abs().sum() > 0) for g in [next(grads) for _ in groups[k]]) for k in expected}
    assert got == expected, f"{name}: gradient reaches {sorted(k for k, v in got.items() if v)}, expected " \
                            f"{sorted(k for k, v in expected.items() if v)}"


# ------------------------------------------------------------------------------------------ guards and clips
def test_cggm_guard_fires_on_the_magnitude_of_the_sum_not_its_sign():
    """CGGM's guard on Eq. 7's denominator S = Σ_k Δ_k fires when |S| < guard_tol, for either sign:
    a large negative S is a real denominator (B_m = (S − Δ_m)/S by hand), a tiny negative one is guarded."""
    from mmbalance.methods.cggm import balance_coefficients

    cases = {(-0.3, -0.2): False, (0.3, 0.2): False, (-0.0004, 0.0001): True, (0.0004, -0.0001): True,
             (0.0015, 0.0005): False, (-0.0015, -0.0005): False}  # |S| = 2e-3: just above the tolerance
    for (d1, d2), fires in cases.items():
        b, hit = balance_coefficients(torch.tensor([d1, d2], dtype=torch.float64), guard_tol=1e-3)
        s = d1 + d2
        want = [1.0, 1.0] if fires else [(s - d1) / s, (s - d2) / s]
        assert bool(hit) == fires and b.tolist() == pytest.approx(want, rel=1e-9), (d1, d2)


def test_agm_exponent_cap_bounds_only_the_boost_side():
    """AGM: κ_m = exp(α·min(r̄_m − r_m, C)) — the cap C bounds a large positive exponent only; a large negative
    one is not clipped (no lower bound unless ``kappa_clamp``). By hand on built scores."""
    from mmbalance.methods.agm import agm_coefficients

    s, s_bar, alpha, cap = torch.tensor([10.0, 0.0]), torch.tensor([0.0, 10.0]), 0.5, 3.0
    r, rb, k = agm_coefficients(s, s_bar, alpha, cap)
    f = 2 / (2 - 1)
    r_hand = [math.exp(f * (5.0 - 10.0)), math.exp(f * (5.0 - 0.0))]
    rb_hand = [math.exp(f * (5.0 - 0.0)), math.exp(f * (5.0 - 10.0))]
    assert r.tolist() == pytest.approx(r_hand) and rb.tolist() == pytest.approx(rb_hand)
    diff = [rb_hand[0] - r_hand[0], rb_hand[1] - r_hand[1]]
    assert diff[0] > cap and diff[1] < -cap  # one exponent above the cap, one below −cap
    assert k.tolist() == pytest.approx([math.exp(alpha * cap), math.exp(alpha * diff[1])], rel=1e-9)
    _, _, k = agm_coefficients(s, s_bar, alpha, cap, clamp=(0.5, 2.0))  # kappa_clamp bounds both sides
    assert k.tolist() == pytest.approx([2.0, 0.5])


# ------------------------------------------------------------------------------------------ phases and sub-steps
def _with_substeps() -> list[str]:
    from mmbalance.interface import BalancingMethod

    return [n for n in one_per_class()
            if METHODS.get(n).factory.training_substeps is not BalancingMethod.training_substeps]


@pytest.mark.parametrize("name", _with_substeps())
def test_each_substep_trains_only_its_modality_encoder(tmp_path, name):
    """Sub-steps (every method with ``training_substeps``: AUG's and MLA's per-modality steps, k-th sub-step =
    k-th modality; a method whose sub-steps are not per modality must say so here): the k-th sub-step's loss
    sends gradient into modality k's encoder and into no other encoder — a stage stepping the wrong learner
    (or every learner) fails. Each sub-step is back-propagated as the engine does, gradients cleared between."""
    tr = _trainer(name, tmp_path)
    ctx = tr.ctx
    batch = tr.data.train.batch(torch.arange(32))
    enc = ctx.raw_model.encoders
    tr.method.on_epoch_start(ctx)
    substeps = tr.method.training_substeps(ctx, batch)
    assert substeps is not None
    seen = []
    for k, step in enumerate(substeps):
        ctx.raw_model.zero_grad(set_to_none=True)
        step.loss.backward()
        reached = [m for m in ctx.modalities
                   if any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in enc[m].parameters())]
        assert reached == [ctx.modalities[k]], f"{name}: sub-step {k} trains the encoders of {reached}"
        seen.append(k)
    assert seen == list(range(len(ctx.modalities)))


# ------------------------------------------------------------------------------------------ stages
def _greedy_stage(meth, ctx) -> str:
    """The step's mode as the method decided it (not the model's gate flags): normal, or caring branch c."""
    c = meth.state.caring
    return "normal" if c is None else f"care:{ctx.modalities[c]}"


def _greedy_moves(stage: str, names: list[str], mods: list[str]) -> set[str]:
    """Greedy §2.3: a normal step trains everything; a re-balancing step for branch c replaces c's gates by
    sg(ḡ_c), so the excitation W_c, b_c of every MMTM block gets no update — everything else does."""
    if stage == "normal":
        return set(names)
    k = mods.index(stage.split(":")[1])
    return {n for n in names if not n.startswith("model.fusion.") or f".excite.{k}." not in n}


def _reconboost_stage(meth, ctx) -> str:
    """The engine phase the step runs in (``s<t>_boost_<m>`` or a rectification phase)."""
    return "boost:" + ctx.phase.split("_boost_")[1] if "_boost_" in ctx.phase else "rectify"


def _reconboost_moves(stage: str, names: list[str], mods: list[str]) -> set[str]:
    """ReconBoost §2: phase 1 of stage t trains learner f_m = H∘φ_m only (φ_m and H, never the other
    encoders nor β); phase 2 (global rectification) trains every encoder, H and β."""
    if stage == "rectify":
        return set(names)
    m = stage.split(":")[1]
    return {n for n in names if n.startswith((f"model.encoders.{m}.", "model.head."))}


#: Methods with stages, and what each stage trains: (settings, epochs, the stage of a step (from the method's
#: own decision or the engine's phase), the parameters that stage must update (every other must not), the
#: stages a run must show). Every parameter of the run's model (``model.*``) and of its extra modules
#: (``<name>.*``: UMT's teachers) is checked at every optimizer step; the ``<m>-only`` runs that train the
#: teachers inside ``setup`` (stage U of UMT and UME) are checked too, as stage ``teacher:<m>``: each trains
#: every parameter of its own model. Not here: sub-steps (AUG, MLA: their own test above).
STAGES = {
    "greedy": ({"start_epoch": 0, "epsilon": 0.0, "window": 1}, 1, _greedy_stage, _greedy_moves, ["normal", "care:"]),
    "reconboost": ({"e1": 1, "e2": 1}, 4, _reconboost_stage, _reconboost_moves,
                   ["boost:fac", "boost:fou", "rectify"]),
    # UMT phase J: the student only; the frozen teachers never move
    "umt": ({}, 1, lambda meth, ctx: "distill", lambda s, names, mods: {n for n in names if n.startswith("model.")},
            ["teacher:fac", "teacher:fou", "distill"]),
    "umt/teacher_init": ({"student_init": "teacher"}, 1, lambda meth, ctx: "distill",
                         lambda s, names, mods: {n for n in names if n.startswith("model.")}, ["distill"]),
    # UME: no joint training (the ensemble phase moves nothing)
    "ume": ({}, 1, lambda meth, ctx: "ensemble", lambda s, names, mods: set(), ["teacher:fac", "teacher:fou", "ensemble"]),
}
#: methods whose stages are not engine phases: Greedy's normal / re-balancing steps, UMT's teachers-then-student
STAGES_NOT_PHASES = {"greedy", "umt"}


def _stage_params(ctx) -> dict[str, torch.nn.Parameter]:
    params = {f"model.{n}": p for n, p in ctx.raw_model.named_parameters()}
    params.update({f"{k}.{n}": p for k, ex in ctx.extra.items() for n, p in ex.module.named_parameters()})
    return params


def _cached_teacher(info) -> dict[str, torch.Tensor]:
    from mmbalance.teachers import TEACHER_FILE

    return torch.load(info.path / TEACHER_FILE, map_location="cpu", weights_only=False)["state_dict"]


def _teacher_handover(key: str, tr: Trainer, before_fit: bool) -> list[str]:
    """Between the stages (UMT, UME): the models the run uses are the ones stage U trained (the cached
    ``<m>-only`` weights, an independent record): UMT's frozen teachers (and, with ``student_init=teacher``,
    the student's encoders before phase J), UME's members."""
    problems = []
    ctx, meth = tr.ctx, tr.method
    for info in meth.teachers:
        m, cached = info.modality, _cached_teacher(info)
        if key.startswith("umt"):
            used = {f"umt_teacher_{m}": ctx.extra[f"umt_teacher_{m}"].module.state_dict()}
        else:
            used = {f"member {m}": ctx.raw_model.members[m].state_dict()}
        if key == "umt/teacher_init" and before_fit:
            enc = {f"encoders.{m}.{n}": t for n, t in ctx.raw_model.encoders[m].state_dict().items()}
            used[f"student encoder {m}"] = {**cached, **enc}
        for what, state in used.items():
            if set(state) != set(cached) or not all(torch.equal(state[n].cpu(), cached[n]) for n in cached):
                problems.append(f"{key}: {what} is not the {m}-only model stage U trained")
    return problems


def test_every_method_with_phases_has_its_stages_checked():
    """A method that declares engine phases (``phases()``) has an entry in :data:`STAGES` (a new one fails here)."""
    from mmbalance.interface import BalancingMethod

    phased = {METHODS.get(n).factory.name for n in one_per_class()
              if METHODS.get(n).factory.phases is not BalancingMethod.phases}
    assert phased, "no method declares phases: the check has no power"
    assert phased <= {k.split("/")[0] for k in STAGES}, f"phases without a stage check: {sorted(phased - set(STAGES))}"
    assert STAGES_NOT_PHASES <= {k.split("/")[0] for k in STAGES}


@pytest.mark.parametrize("key", sorted(STAGES))
def test_each_stage_updates_exactly_the_learners_its_algorithm_names(tmp_path, monkeypatch, key):
    """Phases and stages (a stage stepping the wrong learner): in a short run with plain SGD (no momentum, no
    weight decay: a parameter moves iff the step gives it a gradient and a learning rate), every optimizer
    step is labelled with its stage and must update exactly the parameters that stage trains (by the
    method's equations, :data:`STAGES`); every stage shows up at least once. Parameters are compared
    before and after each real optimizer step."""
    name = key.split("/")[0]
    sets, epochs, stage_of, moves, required = STAGES[key]
    steps: list[tuple[str, dict[str, bool]]] = []
    now = [""]
    real_step = Trainer._step_optimizers

    def recording(self, opts):
        params = _stage_params(self.ctx)
        before = {n: p.detach().clone() for n, p in params.items()}
        out = real_step(self, opts)
        method = str(self.config.method)
        stage = f"teacher:{method.split(':')[1]}" if method.startswith("unimodal:") else now[0]
        steps.append((stage, {n: not torch.equal(p.detach(), before[n]) for n, p in params.items()}))
        return out

    monkeypatch.setattr(Trainer, "_step_optimizers", recording)
    plain_sgd = {"train.momentum": 0.0, "train.weight_decay": 0.0, "train.scheduler": "none"}
    tr = build_trainer(name, "mfeat", run_dir=tmp_path / key.replace("/", "-"), epochs=epochs,
                       output_dir=tmp_path / "shared", sets={**SETS, **plain_sgd, **sets})
    problems = _teacher_handover(key, tr, before_fit=True) if name in ("umt", "ume") else []
    meth, step = tr.method, tr.method.training_step

    def labelled(ctx, batch):
        out = step(ctx, batch)
        now[0] = stage_of(meth, ctx)
        return out

    meth.training_step = labelled
    tr.fit()
    mods = tr.ctx.modalities
    for stage, moved in steps:
        names = sorted(moved)
        want = set(names) if stage.startswith("teacher:") else moves(stage, names, mods)
        wrong = sorted(n for n in names if moved[n] != (n in want))
        if wrong:
            problems.append(f"{key}: a {stage} step updates {[n for n in wrong if moved[n]][:3]} and leaves "
                            f"{[n for n in wrong if not moved[n]][:3]} (expected exactly {sorted(want)[:4]}…)")
    seen = {s for s, _ in steps}
    problems += [f"{key}: no {r!r} step in the run (no power)" for r in required if not any(s.startswith(r) for s in seen)]
    if name in ("umt", "ume"):
        problems += _teacher_handover(key, tr, before_fit=False)
    assert not problems, "\n".join(dict.fromkeys(problems))


# ------------------------------------------------------------------------------------------ units and sources
def _seg_inputs():
    """Two modalities' logits [B=2, C=3, H=2, W=3] whose pixels differ widely, and a per-pixel label map."""
    g = torch.Generator().manual_seed(3)
    u = {m: 3.0 * torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64).float() for m in ("a", "b")}
    return u, torch.randint(0, 3, (2, 2, 3), generator=g)


def _pixel_softmax(u: torch.Tensor, i: int, h: int, w: int) -> list[float]:
    v = [float(x) for x in u[i, :, h, w]]
    z = sum(math.exp(x - max(v)) for x in v)
    return [math.exp(x - max(v)) / z for x in v]


def _pixels(u: torch.Tensor):
    return [(i, h, w) for i in range(u.shape[0]) for h in range(u.shape[2]) for w in range(u.shape[3])]


class _SegCtx:
    """What the statistics read of a step context: a segmentation task, one process."""

    def __init__(self) -> None:
        from mmbalance.tasks import SegmentationTask

        self.task = SegmentationTask(3)

    def reduce_sum(self, x):
        return torch.as_tensor(x, dtype=torch.float64).clone()


def _seg_ogm_ge(u, y):
    """OGM-GE s_m = Σ_images mean_pixels softmax(u_m)[y] (every pixel its own class distribution)."""
    from mmbalance.methods.ogm_ge import score_sums

    got = score_sums("segmentation", u, y).tolist()
    n = u["a"].shape[2] * u["a"].shape[3]
    want = [sum(_pixel_softmax(um, i, h, w)[int(y[i, h, w])] for i, h, w in _pixels(um)) / n for um in u.values()]
    return got, want


def _seg_arl(u, y):
    """ARL: Σ_images mean_pixels Σ_c |u_c| and Σ_images mean_pixels H(softmax(u)) per modality."""
    from mmbalance.methods.arl import magnitude_entropy_sums

    got = magnitude_entropy_sums(u).tolist()
    n = u["a"].shape[2] * u["a"].shape[3]
    mag = [sum(abs(float(x)) for i, h, w in _pixels(um) for x in um[i, :, h, w]) / n for um in u.values()]
    ent = [sum(-sum(p * math.log(p + 1e-16) for p in _pixel_softmax(um, i, h, w)) for i, h, w in _pixels(um)) / n
           for um in u.values()]
    return got, mag + ent


def _seg_mla(u, y):
    """MLA dynamic fusion: per pixel w_m = softmax_m(−H(softmax(u_m)))."""
    from mmbalance.methods.mla import entropy_weights

    outs = list(u.values())
    got = entropy_weights(outs, "sample").flatten().tolist()  # [M, B, H, W]
    want = []
    for k in range(len(outs)):
        for i, h, w in _pixels(outs[k]):
            e = [-sum(p * math.log(p) for p in _pixel_softmax(o, i, h, w)) for o in outs]
            want.append(math.exp(-e[k]) / sum(math.exp(-x) for x in e))
    return got, want


def _seg_reconboost(u, y):
    """ReconBoost's agreement s_i = softmax(β·F_{−m})[y] per pixel (β = 0.7)."""
    from mmbalance.methods.reconboost import ReconBoost

    got = ReconBoost()._agreement(_SegCtx(), u["a"], 1, y, torch.tensor(0.7)).flatten().tolist()
    want = [_pixel_softmax(0.7 * u["a"], i, h, w)[int(y[i, h, w])] for i, h, w in _pixels(u["a"])]
    return got, want


def _seg_agm(u, y):
    """AGM s_m = mean over every pixel of the batch of −log softmax(m_m)[y]."""
    from mmbalance.methods.agm import AGM

    meth = AGM()
    meth.M = 2
    got = meth.scores(_SegCtx(), torch.stack(list(u.values())), {}, {}, y).tolist()
    want = [sum(-math.log(_pixel_softmax(um, i, h, w)[int(y[i, h, w])]) for i, h, w in _pixels(um)) / y.numel()
            for um in u.values()]
    return got, want


def _hand_slice_dice(u: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Per slice: the mean over the regions {1}, {2} of (2|P∩G| + 1e-3)/(|P| + |G| + 1e-3), P = argmax per pixel."""
    out = []
    for i in range(u.shape[0]):
        pix = [(h, w) for h in range(u.shape[2]) for w in range(u.shape[3])]
        pred = {hw: max(range(u.shape[1]), key=lambda c, hw=hw: float(u[i, c, hw[0], hw[1]])) for hw in pix}
        dice = []
        for region in ({1}, {2}):
            p = {hw for hw in pix if pred[hw] in region}
            g = {hw for hw in pix if int(y[i, hw[0], hw[1]]) in region}
            dice.append((2 * len(p & g) + 1e-3) / (len(p) + len(g) + 1e-3))
        out.append(sum(dice) / len(dice))
    return out


def _seg_mslr(u, y):
    """MSLR's metric a_m (and CGGM's ε, the task's batch score): the mean over slices of each slice's mean region
    Dice — (Σ_slices, slice count) — and the per-sample terms, one per slice."""
    from mmbalance.methods.mslr import metric_parts, per_sample_metric

    task = _SegCtx().task
    per = _hand_slice_dice(u["a"], y)
    got = [*metric_parts("segmentation", task, u["a"], y), *per_sample_metric("segmentation", task, u["a"], y).tolist()]
    return got, [sum(per), float(len(per)), *per]


def _seg_lfm(u, y):
    """LFM's alignment L_align = the mean over pixels of JS(p_a, p_b), each pixel its own distributions."""
    from mmbalance.methods.lfm import alignment_loss

    got = [float(alignment_loss(u, "js"))]
    js = []
    for i, h, w in _pixels(u["a"]):
        p, q = _pixel_softmax(u["a"], i, h, w), _pixel_softmax(u["b"], i, h, w)
        r = [(x + z) / 2 for x, z in zip(p, q)]
        js.append(0.5 * sum(x * math.log(x / c) for x, c in zip(p, r)) + 0.5 * sum(z * math.log(z / c) for z, c in zip(q, r)))
    return got, [sum(js) / len(js)]


def _seg_mbsd(u, y):
    """MBSD's L^{jl} = the mean over pixels of w·(RS + KL): per pixel q = softmax(u)[y], w = c·(q_s − q_w) with c
    = either head right at that pixel, RS = mean_c (u_j − u_l)², KL = q_w·(log q_w − q_s) (the code's form)."""
    from mmbalance.methods.mbsd import mbsd_pair

    got = [float(mbsd_pair(u["a"], u["b"], y)[0])]
    terms = []
    for i, h, w in _pixels(u["a"]):
        k = int(y[i, h, w])
        pj, pl = _pixel_softmax(u["a"], i, h, w), _pixel_softmax(u["b"], i, h, w)
        right = any(max(range(3), key=lambda c, o=o: float(o[i, c, h, w])) == k for o in (u["a"], u["b"]))
        qs, qw = max(pj[k], pl[k]), min(pj[k], pl[k])
        rs = sum((float(u["a"][i, c, h, w]) - float(u["b"][i, c, h, w])) ** 2 for c in range(3)) / 3
        terms.append(float(right) * (qs - qw) * (rs + qw * (math.log(qw) - qs)))
    return got, [sum(terms) / len(terms)]


def _seg_aug(u, y):
    """AUG (no member yet): ℓ = the mean over pixels of CE, S = Σ_images mean_pixels softmax(F)[y]."""
    from mmbalance.methods.aug import aug_loss

    loss, _, conf = aug_loss(u["a"], None, None, y, 0.5, "segmentation")
    n = u["a"].shape[2] * u["a"].shape[3]
    p = [_pixel_softmax(u["a"], i, h, w)[int(y[i, h, w])] for i, h, w in _pixels(u["a"])]
    return [float(loss), float(conf)], [-sum(math.log(x) for x in p) / len(p), sum(p) / n]


#: statistics computed from segmentation outputs, each by hand in its documented unit: per pixel (a loop over
#: the pixels), or per slice where the method's statistic is the task's per-slice Dice (MSLR, CGGM)
SEGMENTATION_STATISTICS = {"ogm_ge": _seg_ogm_ge, "arl": _seg_arl, "mla": _seg_mla, "reconboost": _seg_reconboost,
                           "agm": _seg_agm, "mslr": _seg_mslr, "lfm": _seg_lfm, "mbsd": _seg_mbsd, "aug": _seg_aug}


@pytest.mark.parametrize("name", sorted(SEGMENTATION_STATISTICS))
def test_segmentation_statistics_have_their_documented_unit_by_hand(name):
    """Units (a score per image instead of per pixel): on segmentation logits whose pixels differ widely, a
    method's per-sample statistic equals its definition computed by hand pixel by pixel — a class distribution
    per pixel, averaged (or summed) with the documented unit; a per-slice Dice per slice. Pooling the logits over
    an image, normalising over the wrong axis, one Dice for the whole batch, or dividing by the image count
    instead of the pixel count (or the other way round) fails."""
    u, y = _seg_inputs()
    got, want = SEGMENTATION_STATISTICS[name](u, y)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6), name


def _running_agm(tr, steps: list[dict]) -> list[str]:
    """AGM: S̄_m = the mean of modality m's own per-step scores s_m (cumulative, agm.md step 5)."""
    out = tr.method.metrics()
    problems = []
    for m in tr.ctx.modalities:
        want = sum(float(s[f"agm/s_{m}"]) for s in steps) / len(steps)
        if out[f"s_bar_{m}"] != pytest.approx(want, rel=1e-9):
            problems.append(f"agm: s_bar_{m} = {out[f's_bar_{m}']}, the mean of its own scores {want}")
    return problems


def _running_greedy(tr, steps: list[dict]) -> list[str]:
    """Greedy: ḡ_m of each MMTM block = the mean of branch m's OWN batch-mean gate over the training forwards
    (the official code feeds the second branch's average with the first branch's gate)."""
    problems = []
    for j, block in enumerate(tr.ctx.raw_model.mmtm_blocks):
        seen = [s[f"gate{j}"] for s in steps]
        for k, m in enumerate(tr.ctx.modalities):
            want = torch.stack([g[k] for g in seen]).mean(0)
            if not torch.allclose(block.gate_avg(k).double(), want, rtol=1e-5, atol=1e-7):
                problems.append(f"greedy: block {j}'s running gate average of {m} is not the mean of {m}'s own gates")
    return problems


def _record_greedy(tr, record: dict) -> None:
    for j, block in enumerate(tr.ctx.raw_model.mmtm_blocks):
        forward = block.forward

        def watched(feats, forward=forward, block=block, j=j):
            out = forward(feats)
            if block.training:
                record[f"gate{j}"] = [s.double() / block.last_count for s in block.last_gate_sum]
            return out

        block.forward = watched


def _running_masam(tr, steps: list[dict]) -> list[str]:
    """MASAM: MA_m = EMA_β of modality m's own batch loss ℓ_m (MA = ℓ on the first step)."""
    beta, out, problems = tr.method.hp.ema, tr.method.metrics(), []
    for m in tr.ctx.modalities:
        ma = None
        for st in steps:
            loss = float(st[f"masam/loss_{m}"])
            ma = loss if ma is None else beta * ma + (1 - beta) * loss
        if out[f"ma_{m}"] != pytest.approx(ma, rel=1e-6):
            problems.append(f"masam: ma_{m} = {out[f'ma_{m}']}, the EMA of its own losses {ma}")
    return problems


def _record_qmf(tr, record: dict) -> None:
    """Before each step (the parameters the step's forward sees): every sample's CE of each modality's own
    output head_m(encoder_m(x_m)), by hand."""
    import torch.nn.functional as F

    step = tr.method.training_step

    def hand_first(ctx, batch):
        enc, heads = ctx.raw_model.encoders, ctx.modules["qmf_heads"].heads
        with torch.no_grad():
            record["qmf"] = (batch["idx"].clone(), torch.stack([
                F.cross_entropy(heads[m](enc[m](batch[m])).double(), batch["label"].long(), reduction="none")
                for m in ctx.modalities]))
        return step(ctx, batch)

    tr.method.training_step = hand_first


def _running_qmf(tr, steps: list[dict]) -> list[str]:
    """QMF: H_m[i] = the sum of sample i's OWN modality-m losses over the steps that drew it (qmf.md step 6)."""
    want = torch.zeros_like(tr.method.history)
    for st in steps:
        idx, losses = st["qmf"]
        want.index_add_(1, idx.long(), losses)
    if torch.allclose(tr.method.history, want, rtol=1e-5, atol=1e-7):
        return []
    return ["qmf: the per-sample loss history is not each modality's own losses summed"]


def _record_mslr(tr, record: dict) -> None:
    """After each epoch end: the held-out metrics a_m the update used and the resulting lr multipliers."""
    end = tr.method.on_epoch_end
    record["epochs"] = []

    def after(ctx):
        out = end(ctx)
        record["epochs"].append(tr.method.metrics())
        return out

    tr.method.on_epoch_end = after


def _running_mslr(tr, steps: list[dict]) -> list[str]:
    """MSLR (window K = 2): from the third epoch, lr_mult_m = c⁰·a_m(e)/mean(a_m(e−2), a_m(e−1)) — modality m's
    own memory of its own held-out metrics (mslr.md steps 4–6); 1 before the memory is full."""
    epochs, problems = steps[-1]["epochs"], []
    assert len(epochs) >= 3
    for m in tr.ctx.modalities:
        a = [e[f"a_{m}"] for e in epochs]
        want = [1.0, 1.0] + [a[e] / ((a[e - 2] + a[e - 1]) / 2) for e in range(2, len(a))]
        got = [e[f"lr_mult_{m}"] for e in epochs]
        if got != pytest.approx(want, rel=1e-9):
            problems.append(f"mslr: lr_mult_{m} per epoch {got}, from its own metrics {want}")
    if all(e[f"a_{tr.ctx.modalities[0]}"] == e[f"a_{tr.ctx.modalities[1]}"] for e in epochs):
        problems.append("mslr: both modalities have the same metrics (no power)")
    return problems


#: per-modality running statistics and how each is built from its own modality's values (by hand). Each run
#: has modalities whose values differ, so a statistic fed another modality's value differs from the hand one.
RUNNING = {"agm": (_running_agm, None), "greedy": (_running_greedy, _record_greedy),
           "masam": (_running_masam, None), "qmf": (_running_qmf, _record_qmf), "mslr": (_running_mslr, _record_mslr)}
#: settings that make the run long enough for the statistic to be used
RUNNING_SETS = {"greedy": {"start_epoch": 5}, "mslr": {"window": 2}}
RUNNING_EPOCHS = {"mslr": 4}


@pytest.mark.parametrize("name", sorted(RUNNING))
def test_per_modality_running_statistics_are_fed_their_own_modality(tmp_path, name):
    """Sources (a per-branch running average fed another branch's value): after a short run, each modality's
    running statistic equals its documented average of that modality's own per-step values, recorded as the
    run goes (the method's step logs, or the model's own per-branch values); the modalities' values differ."""
    check, install = RUNNING[name]
    tr = _trainer(name, tmp_path, {"train.max_steps_per_epoch": 3, **RUNNING_SETS.get(name, {})})
    tr.cfg.epochs = RUNNING_EPOCHS.get(name, tr.cfg.epochs)
    steps: list[dict] = []
    current: dict = {}
    if install is not None:
        install(tr, current)
    step = tr.method.training_step

    def logged(ctx, batch):
        out = step(ctx, batch)
        steps.append({**out.logs, **current})
        return out

    tr.method.training_step = logged
    tr.fit()
    assert len(steps) >= 3
    problems = check(tr, steps)
    assert not problems, "\n".join(problems)


def test_pmr_prototypes_are_each_modality_own_class_means(tmp_path):
    """PMR's first prototypes: c_m,k = the mean pooled embedding of modality m's encoder over the drawn training
    samples of class k (eval mode), by hand from the samples the method reports it drew; m's prototype from
    another modality's embeddings fails (both modalities have 64-d embeddings here)."""
    tr = _trainer("pmr", tmp_path)
    protos = tr.method.compute_prototypes(tr.ctx).double()
    idx = tr.method.last_subset_idx
    batch = tr.data.train.batch(idx)
    model = tr.ctx.raw_model
    model.eval()
    with torch.no_grad():
        out = model({m: batch[m] for m in tr.ctx.modalities})
    model.train()
    y = batch["label"].long()
    for j, m in enumerate(tr.ctx.modalities):
        z = out.pooled[m].double()
        for k in range(protos.shape[1]):
            want = z[y == k].mean(0)
            torch.testing.assert_close(protos[j, k, : z.shape[1]], want, rtol=1e-5, atol=1e-6,
                                       msg=lambda s, m=m, k=k: f"pmr: prototype of {m}, class {k}: {s}")
    assert not torch.allclose(protos[0], protos[1]), "both modalities' prototypes are equal: no power"


# ------------------------------------------------------------------------------------------ auxiliary losses
def _uni_ce(tr, out, y, bias_share: bool) -> list[float]:
    """ℓ(u_m, y) per modality (modality order) by hand: u_m = z̄_m·W[:, block m]ᵀ + b (÷M when ``bias_share``), the
    blocks of the concat-linear head's weight taken in modality order from the feature widths."""
    import torch.nn.functional as F

    raw, mods = tr.ctx.raw_model, tr.ctx.modalities
    w, b = raw.final_layer().weight, raw.final_layer().bias
    start, out_m = 0, []
    for m in mods:
        d = raw.feature_dims[m]
        u = out.pooled[m] @ w[:, start:start + d].T + (b / len(mods) if bias_share else b)
        out_m.append(float(F.cross_entropy(u.double(), y)))
        start += d
    return out_m


def _fused_ce(out, y) -> float:
    import torch.nn.functional as F

    return float(F.cross_entropy(out.logits.double(), y))


def _aux_multitask(tr, batch, out, y):
    """Multitask: ℓ(ŷ) + Σ_m γ_m·ℓ(u_m) (shared slice), γ_m = γ (sum), γ/M (mean) or gamma_per_modality[m]."""
    hp, M = tr.method.hp, len(tr.ctx.modalities)
    gammas = (list(hp.gamma_per_modality) if hp.gamma_per_modality is not None else [hp.gamma] * M)
    if hp.reduction == "mean":
        gammas = [g / M for g in gammas]
    return _fused_ce(out, y) + sum(g * lm for g, lm in zip(gammas, _uni_ce(tr, out, y, bias_share=True)))


def _aux_dgl(tr, batch, out, y):
    """DGL: ℓ(ŷ) + α·Σ_m ℓ(u_m) (zero-padded shared head: the full bias)."""
    return _fused_ce(out, y) + tr.method.hp.alpha * sum(_uni_ce(tr, out, y, bias_share=False))


def _aux_cggm(tr, batch, out, y):
    """CGGM (first step, no direction term yet): ℓ(ŷ) + Σ_m ℓ(f_m(z_m)) (sum, official) or ÷M (mean)."""
    import torch.nn.functional as F

    o = tr.ctx.modules["cggm_classifiers"]({m: out.features[m].detach() for m in tr.ctx.modalities})
    total = sum(float(F.cross_entropy(o[m].double(), y)) for m in tr.ctx.modalities)
    return _fused_ce(out, y) + (total / len(tr.ctx.modalities) if tr.method.hp.aux_loss_reduction == "mean" else total)


def _aux_umt(tr, batch, out, y):
    """UMT: ℓ(ŷ) + λ·Σ_m MSE(z_m, t_m) — a sum over modalities, each MSE a mean over its elements."""
    total = 0.0
    for m in tr.ctx.modalities:
        t = tr.ctx.modules[f"umt_teacher_{m}"].encode({m: batch[m]})[m]
        total += float(((out.features[m].double() - t.double()) ** 2).mean())
    return _fused_ce(out, y) + tr.method.hp.lam * total


def _aux_gblending(tr, batch, out, y):
    """G-Blending with fixed ``weights=[0.2, 0.5, 0.3]`` (normalised; one per modality in dataset order, then the
    fused head): L = 0.2·ℓ(C_fac) + 0.5·ℓ(C_fou) + 0.3·ℓ(ŷ), C_m the linear head on z̄_m."""
    import torch.nn.functional as F

    heads = tr.ctx.modules["gb_heads"].heads
    uni = [float(F.cross_entropy(heads[m](out.pooled[m]).double(), y)) for m in tr.ctx.modalities]
    return 0.2 * uni[0] + 0.5 * uni[1] + 0.3 * _fused_ce(out, y)


def _light_ce(tr, out, y, module: str) -> list[float]:
    """ℓ(u_m, y) per modality (modality order), u_m = the method's own light head of modality m on z_m, by hand."""
    import torch.nn.functional as F

    heads = tr.ctx.modules[module].heads
    return [float(F.cross_entropy(heads[m](out.features[m]).double(), y)) for m in tr.ctx.modalities]


def _aux_mmpareto(tr, batch, out, y):
    """MMPareto: the loss is ℓ(ŷ) + Σ_m ℓ(u_m) (separate heads; the Pareto integration edits the gradients)."""
    return _fused_ce(out, y) + sum(_light_ce(tr, out, y, "mmpareto_heads"))


def _aux_inforeg(tr, batch, out, y):
    """InfoReg: ℓ(ŷ) + Σ_m ℓ(u_m) (shared slice)."""
    return _fused_ce(out, y) + sum(_uni_ce(tr, out, y, bias_share=True))


def _aux_arl(tr, batch, out, y):
    """ARL after its warm-up: ℓ(ŷ) + γ·Σ_m ℓ(u_m) (zero-padded shared head: the full bias)."""
    return _fused_ce(out, y) + tr.method.hp.gamma * sum(_uni_ce(tr, out, y, bias_share=False))


def _aux_remix(tr, batch, out, y):
    """ReMix in its warm-up: ℓ(ŷ) + Σ_m w·ℓ(u_m), w = ``warmup_weight`` per modality (light heads)."""
    return _fused_ce(out, y) + tr.method.hp.warmup_weight * sum(_light_ce(tr, out, y, "remix_heads"))


#: methods with per-modality auxiliary losses: (settings, the auxiliary part of the loss by hand); the
#: settings bind the reduction and per-modality weights to values whose plausible misreadings differ
AUX_LOSSES = {
    "multitask": ({}, _aux_multitask),
    "multitask/mean": ({"reduction": "mean", "gamma": 3.0}, _aux_multitask),
    "multitask/per_modality": ({"gamma_per_modality": "[0.3,2.0]"}, _aux_multitask),
    "dgl": ({}, _aux_dgl),
    "cggm": ({}, _aux_cggm),
    "cggm/mean": ({"aux_loss_reduction": "mean"}, _aux_cggm),
    "umt": ({}, _aux_umt),
    "gblending/weights": ({"weights": "[0.2,0.5,0.3]"}, _aux_gblending),
    "mmpareto": ({}, _aux_mmpareto),
    "inforeg": ({}, _aux_inforeg),
    "arl": ({"start": -1}, _aux_arl),  # γ from the first epoch
    "remix": ({"warmup_epochs": 1}, _aux_remix),
}
#: methods computing per-modality losses (``unimodal_losses``) whose combination is checked elsewhere, and where
AUX_LOSSES_ELSEWHERE = {
    "masam": "the returned loss is the perturbed second pass (SAM): "
             "tests/test_masam.py::test_one_step_matches_plain_pytorch_and_steps_at_restored_weights",
    "mbsd": "plus the pairwise distillation term, by hand: "
            "tests/test_mbsd.py::test_shared_slices_sum_to_the_fused_logits_and_window",
    "amco": "on randomly masked outputs: tests/test_amco.py::test_loss_is_fused_plus_unimodal_and_full_mask_zeroes_the_"
            "encoder_gradient",
}


def test_every_method_with_unimodal_losses_has_its_combination_checked():
    """A method that computes per-modality losses (calls ``unimodal_losses``) is in :data:`AUX_LOSSES`, or in
    :data:`AUX_LOSSES_ELSEWHERE` with the reason and the test that checks it (a new one fails here)."""
    import inspect

    from conftest import REPO

    using = {METHODS.get(n).factory.name for n in list_methods()
             if "unimodal_losses(" in inspect.getsource(inspect.getmodule(METHODS.get(n).factory))}
    covered = {k.split("/")[0] for k in AUX_LOSSES} | set(AUX_LOSSES_ELSEWHERE)
    assert using and using <= covered, f"unchecked: {sorted(using - covered)}"
    for why in AUX_LOSSES_ELSEWHERE.values():
        path, func = why.split(": ")[-1].split("::")
        assert f"def {func}(" in (REPO / path).read_text(), why


@pytest.mark.parametrize("key", sorted(AUX_LOSSES))
def test_auxiliary_losses_combine_the_modalities_as_documented(tmp_path, key):
    """Defaults and presets (an auxiliary loss's reduction, per-modality parameter order): one training step's
    loss equals the fused loss ℓ(ŷ, y) and the method's per-modality terms combined by hand as documented — Σ or
    mean over modalities, each modality's own weight — on a batch where the modalities' terms differ (a sum read
    as a mean, or weights in the wrong modality order, changes the loss)."""
    name = key.split("/")[0]
    sets, hand = AUX_LOSSES[key]
    tr = _trainer(name, tmp_path, sets)
    batch = tr.data.train.batch(torch.arange(40))
    tr.method.on_epoch_start(tr.ctx)
    step = tr.method.training_step(tr.ctx, batch)
    y = batch["label"].long()
    with torch.no_grad():
        out = tr.ctx.raw_model({m: batch[m] for m in tr.ctx.modalities})
        want = hand(tr, batch, out, y)
    assert float(step.loss) == pytest.approx(want, rel=1e-5), key


# ------------------------------------------------------------------------------------------ per-modality values
def _order_mrd(tmp_path):
    """MRD ``p_per_modality=[0, 1]`` (bernoulli): the first modality is never dropped, the second always."""
    from mmbalance.methods.mrd import MRDHParams, draw_drop_mask

    mask = draw_drop_mask(64, 2, MRDHParams(mode="bernoulli", p_per_modality=[0.0, 1.0]), torch.Generator().manual_seed(0))
    return mask.float().mean(0).tolist(), [0.0, 1.0]


def _order_mla(tmp_path):
    """MLA ``fusion=fixed, fixed_weights=[0.8, 0.2]``: predict = 0.8·H(z̄_fac) + 0.2·H(z̄_fou)."""
    tr = _trainer("mla", tmp_path, {"fusion": "fixed", "fixed_weights": "[0.8,0.2]"})
    batch = tr.data.val.batch(torch.arange(8))
    enc, head = tr.ctx.raw_model.encoders, tr.ctx.modules["mla_head"]
    tr._eval_mode(True)
    with torch.no_grad():
        got = tr.method.predict(tr.ctx, batch)
        want = 0.8 * head.out(enc["fac"](batch["fac"])) + 0.2 * head.out(enc["fou"](batch["fou"]))
    return got.flatten().tolist(), want.flatten().tolist()


def _order_aug(tmp_path):
    """AUG ``merge_weights=[3, 1]``: predict = (3·F_fac + 1·F_fou)/4."""
    tr = _trainer("aug", tmp_path, {"merge_weights": "[3.0,1.0]"})
    batch = tr.data.val.batch(torch.arange(8))
    enc, heads = tr.ctx.raw_model.encoders, tr.ctx.modules["aug_heads"]
    tr._eval_mode(True)
    with torch.no_grad():
        got = tr.method.predict(tr.ctx, batch)
        want = (3.0 * heads("fac", enc["fac"](batch["fac"]))[0] + heads("fou", enc["fou"](batch["fou"]))[0]) / 4.0
    return got.flatten().tolist(), want.flatten().tolist()


def _order_mslr(tmp_path):
    """MSLR ``c0=[2.0, 0.5]``: every parameter of the fac encoder trains at lr_mult 2.0, of the fou encoder at 0.5."""
    tr = _trainer("mslr", tmp_path, {"c0": "[2.0,0.5]"})
    mult = {id(p): g["lr_mult"] for g in tr.ctx.optimizer.param_groups for p in g["params"]}
    enc = tr.ctx.raw_model.encoders
    return [mult[id(p)] for m in ("fac", "fou") for p in enc[m].parameters()], \
        [c for c, m in ((2.0, "fac"), (0.5, "fou")) for _ in enc[m].parameters()]


def _order_inforeg(tmp_path):
    """InfoReg ``constants=fixed, c_fixed=[0.7, 0.2]``: the constants, indexed by modality position, are (0.7, 0.2)."""
    tr = _trainer("inforeg", tmp_path, {"constants": "fixed", "c_fixed": "[0.7,0.2]"})
    return tr.method.constants().tolist(), [0.7, 0.2]


#: per-modality hyperparameter lists (dataset order) besides those in AUX_LOSSES (multitask's
#: ``gamma_per_modality``, G-Blending's ``weights``): distinct values, the behaviour they set by hand
PER_MODALITY_VALUES = {"mrd": _order_mrd, "mla": _order_mla, "aug": _order_aug, "mslr": _order_mslr,
                       "inforeg": _order_inforeg}
#: every hyperparameter that takes one value per modality, and where its order is checked
PER_MODALITY_FIELDS = {("aug", "merge_weights"): "aug", ("mla", "fixed_weights"): "mla",
                       ("mrd", "p_per_modality"): "mrd", ("mslr", "c0"): "mslr", ("inforeg", "c_fixed"): "inforeg",
                       ("multitask", "gamma_per_modality"): "multitask/per_modality",
                       ("gblending", "weights"): "gblending/weights"}


def test_every_per_modality_hyperparameter_has_its_order_checked():
    """A hyperparameter typed as a list of numbers (one per modality) is in :data:`PER_MODALITY_FIELDS`, with a
    case in :data:`PER_MODALITY_VALUES` or :data:`AUX_LOSSES` (a new one fails here)."""
    import dataclasses

    found = set()
    for n in list_methods():
        factory = METHODS.get(n).factory
        hp = getattr(factory, "hparams_cls", None)
        if hp is not None and dataclasses.is_dataclass(hp):
            found |= {(factory.name, f.name) for f in dataclasses.fields(hp) if "list[float]" in str(f.type)}
    assert found == set(PER_MODALITY_FIELDS), f"unchecked: {sorted(found - set(PER_MODALITY_FIELDS))}"
    assert set(PER_MODALITY_FIELDS.values()) <= set(PER_MODALITY_VALUES) | set(AUX_LOSSES)


@pytest.mark.parametrize("name", sorted(PER_MODALITY_VALUES))
def test_per_modality_values_apply_in_modality_order(tmp_path, name):
    """Defaults and presets (per-modality parameter order): a hyperparameter given as one value per modality
    applies its k-th value to the k-th modality of the dataset order — by hand on the behaviour it sets (a drop
    probability, a fusion weight), with values whose reversal changes it."""
    got, want = PER_MODALITY_VALUES[name](tmp_path)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6), name
