"""Tests of mmbalance.tasks against hand-computed values (specs: mfeat.md §8, mosi.md §3 and §6,
brats2021.md §5, cggm.md §3 step 7a and §8)."""

from __future__ import annotations

import math

import pytest
import torch

from mmbalance.errors import ConfigError
from mmbalance.tasks import (
    BRATS_CE_WEIGHTS,
    ClassificationTask,
    RegressionTask,
    SegmentationTask,
    create_task,
    f1_scores,
)

# ----------------------------------------------------------------------------- classification

# truth y = 0 0 0 1 1 2 ; prediction = 0 0 1 1 2 2
# confusion[true, pred] = [[2, 1, 0],
#                          [0, 1, 1],
#                          [0, 0, 1]]
# accuracy = 4/6
# class 0: TP 2, FP 0, FN 1 -> F1 = 2·2/(2·2 + 0 + 1) = 4/5
# class 1: TP 1, FP 1, FN 1 -> F1 = 2/(2 + 1 + 1)     = 1/2
# class 2: TP 1, FP 1, FN 0 -> F1 = 2/(2 + 1 + 0)     = 2/3
# macro    = (4/5 + 1/2 + 2/3)/3             = 59/90  ≈ 0.65556
# weighted = (3·4/5 + 2·1/2 + 1·2/3)/6       = 61/90  ≈ 0.67778
# ua       = mean recall = (2/3 + 1/2 + 1)/3 = 13/18  ≈ 0.72222
Y_CLS = torch.tensor([0, 0, 0, 1, 1, 2])
P_CLS = torch.tensor([0, 0, 1, 1, 2, 2])


def _onehot_logits(pred: torch.Tensor, k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, k).float() * 5.0


def test_classification_metrics_hand_computed() -> None:
    task = ClassificationTask(num_classes=3)
    meter = task.new_meter()
    meter.update(_onehot_logits(P_CLS, 3), Y_CLS)
    m = meter.compute()
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1_macro"] == pytest.approx(59 / 90)
    assert m["f1_weighted"] == pytest.approx(61 / 90)
    assert m["ua"] == pytest.approx(13 / 18)
    assert "acc_top5" not in m  # only with more than 5 classes
    assert meter.confusion.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert set(m) == {"accuracy", "f1_macro", "f1_weighted", "ua", "loss"}
    assert all(isinstance(v, float) for v in m.values())


def test_f1_undefined_class_counts_zero() -> None:
    # a 4th class never present and never predicted: its F1 is 0 (undefined), macro divides by 4,
    # the support-weighted F1 is unchanged (support 0)
    cm = torch.tensor([[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    macro, weighted = f1_scores(cm)
    assert macro == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 4)
    assert weighted == pytest.approx(61 / 90)
    assert f1_scores(torch.zeros(2, 2, dtype=torch.long)) == (0.0, 0.0)


def test_classification_top5_and_loss() -> None:
    task = ClassificationTask(num_classes=7)
    logits = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1], [7.0, 6, 5, 4, 3, 2, 1]])
    meter = task.new_meter()
    meter.update(logits, torch.tensor([4, 5]))  # class 4 is in the top 5, class 5 is not
    assert meter.compute()["acc_top5"] == pytest.approx(0.5)
    # uniform logits: CE = ln K, also with class weights (weighted mean of equal terms)
    uniform = torch.zeros(4, 3)
    y = torch.tensor([0, 1, 2, 2])
    assert float(ClassificationTask(3).loss(uniform, y)) == pytest.approx(math.log(3))
    assert float(ClassificationTask(3, class_weights=[1.0, 2.0, 3.0]).loss(uniform, y)) == pytest.approx(
        math.log(3)
    )
    assert float(task.loss(_onehot_logits(torch.tensor([1]), 7) * 10, torch.tensor([1]))) < 1e-10


def test_classification_batch_score_and_compare() -> None:
    task = ClassificationTask(num_classes=3)
    logits = _onehot_logits(P_CLS, 3)
    num, den = task.batch_score_parts(logits, Y_CLS)
    assert (float(num), float(den)) == (4.0, 6.0)
    assert float(task.batch_score(logits, Y_CLS)) == pytest.approx(float(num / den))
    assert task.primary_metric == "accuracy" and task.higher_is_better
    assert task.compare(0.9, 0.8) == 1 and task.compare(0.8, 0.9) == -1 and task.compare(0.8, 0.8) == 0
    assert task.compare(float("nan"), 0.1) == -1 and task.compare(0.1, float("nan")) == 1
    assert task.prediction(logits).tolist() == P_CLS.tolist()


# ----------------------------------------------------------------------------- regression

# mosi.md §6: y = (−2, −0.4, 0, 0.6, 2.5), ŷ = (−1.6, 0.2, −0.1, 0.9, 3.4)
Y_REG = torch.tensor([-2.0, -0.4, 0.0, 0.6, 2.5])
P_REG = torch.tensor([-1.6, 0.2, -0.1, 0.9, 3.4])


def test_regression_mosi_worked_example() -> None:
    task = RegressionTask()
    meter = task.new_meter()
    meter.update(P_REG[:, None], Y_REG)  # logits [B, 1]
    m = meter.compute()
    # |errors| = 0.4 0.6 0.1 0.3 0.9 -> 2.3/5
    assert m["mae"] == pytest.approx(0.46)
    assert m["loss"] == pytest.approx(0.46)
    assert m["corr"] == pytest.approx(0.98363, abs=1e-5)
    # acc7: round(clip(·, ±3)): y -> −2 −0 0 1 2 (2.5 -> 2, half to even); ŷ -> −2 0 −0 1 3 -> 4/5
    assert m["acc7"] == pytest.approx(0.8)
    # acc5: clip ±2: y -> −2 0 0 1 2; ŷ -> −2 0 0 1 2 -> 5/5
    assert m["acc5"] == pytest.approx(1.0)
    # nn: y ≥ 0: F F T T T; ŷ ≥ 0: F T F T T -> 3/5
    #   neg: TP 1 FP 1 FN 1 -> F1 1/2; pos: TP 2 FP 1 FN 1 -> 2/3; weighted (2·1/2 + 3·2/3)/5 = 0.6
    assert m["acc2_nn"] == pytest.approx(0.6)
    assert m["f1_nn"] == pytest.approx(0.6)
    # nz (drop y = 0): y > 0: F F T T; ŷ > 0: F T T T -> 3/4
    #   neg: TP 1 FP 0 FN 1 -> 2/3; pos: TP 2 FP 1 FN 0 -> 4/5; weighted (2·2/3 + 2·4/5)/4 = 11/15
    assert m["acc2_nz"] == pytest.approx(0.75)
    assert m["f1_nz"] == pytest.approx(11 / 15)
    # cggm (zeros negative): y > 0: F F F T T; ŷ > 0: F T F T T -> 4/5
    #   neg: TP 2 FP 0 FN 1 -> 4/5; pos: TP 2 FP 1 FN 0 -> 4/5; weighted 4/5
    assert m["acc2_cggm"] == pytest.approx(0.8)
    assert m["f1_cggm"] == pytest.approx(0.8)
    # per-batch score = acc2_cggm, via the parts
    num, den = task.batch_score_parts(P_REG, Y_REG)
    assert (float(num), float(den)) == (4.0, 5.0)
    assert float(task.batch_score(P_REG, Y_REG)) == pytest.approx(0.8)


def test_regression_half_to_even_and_cggm_metric() -> None:
    task = RegressionTask()
    meter = task.new_meter()
    # 0.5 -> 0 and −1.5 -> −2 and 2.5 -> 2 under half-to-even (half away from zero would give 1, −2, 3)
    meter.update(torch.tensor([0.4, -2.4, 2.0]), torch.tensor([0.5, -1.5, 2.5]))
    assert meter.compute()["acc7"] == pytest.approx(1.0)
    # cggm.md §8 item 11: y = (0, 1, −1), o = (0.5, 0.5, −0.5) -> ε = 2/3
    assert float(task.batch_score(torch.tensor([[0.5], [0.5], [-0.5]]), torch.tensor([0.0, 1.0, -1.0]))) == (
        pytest.approx(2 / 3)
    )


def test_regression_undefined_corr_and_loss_shapes() -> None:
    task = RegressionTask()
    meter = task.new_meter()
    meter.update(torch.ones(3), torch.tensor([1.0, 2.0, 3.0]))  # constant prediction
    m = meter.compute()
    assert m["corr"] == 0.0
    assert m["mae"] == pytest.approx(1.0)
    assert float(task.loss(P_REG, Y_REG)) == pytest.approx(float(task.loss(P_REG[:, None], Y_REG[:, None])))
    assert task.prediction(P_REG[:, None]).shape == (5,)
    assert task.primary_metric == "mae" and not task.higher_is_better
    assert task.compare(0.9, 1.0) == 1 and task.compare(1.0, 0.9) == -1 and task.compare(1.0, 1.0) == 0
    with pytest.raises(ValueError):
        task.loss(torch.zeros(4, 2), torch.zeros(4))


# ----------------------------------------------------------------------------- segmentation

E = 1e-3
# classes after 4 -> 3: 0 bg, 1 NCR/NET, 2 ED, 3 ET; WT = {1,2,3} ⊃ TC = {1,3} ⊃ ET = {3}
# fmt: off
T1 = torch.tensor([[0, 0, 0, 0],
                   [0, 2, 2, 0],
                   [0, 1, 3, 0],
                   [0, 0, 0, 0]])  # WT 4 px, TC 2 px (1 at (2,1), 3 at (2,2)), ET 1 px at (2,2)
P1 = torch.tensor([[0, 0, 0, 0],
                   [0, 2, 2, 2],
                   [0, 3, 2, 0],
                   [0, 0, 0, 0]])  # WT 5 px, TC = ET = {(2,1)}
# fmt: on
# WT: |P∩G| = 4, |P| + |G| = 5 + 4 -> (8 + e)/(9 + e)
# TC: P = {(2,1)}, G = {(2,1),(2,2)}: |P∩G| = 1 -> (2 + e)/(3 + e)
# ET: P = {(2,1)}, G = {(2,2)}: |P∩G| = 0 -> e/(2 + e) ≈ 0
WT1, TC1, ET1 = (8 + E) / (9 + E), (2 + E) / (3 + E), E / (2 + E)
T2 = torch.zeros(4, 4, dtype=torch.long)  # empty truth and empty prediction: every Dice = 1
P2 = torch.zeros(4, 4, dtype=torch.long)


def _seg_logits(pred: torch.Tensor, k: int = 4) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, k).permute(0, 3, 1, 2).float() * 10.0


def test_segmentation_region_dice_hand_computed() -> None:
    task = SegmentationTask(num_classes=4)
    assert list(task.regions) == ["dice_wt", "dice_tc", "dice_et"]
    meter = task.new_meter()
    meter.update(_seg_logits(torch.stack([P1, P2])), torch.stack([T1, T2]))
    m = meter.compute()
    assert m["dice_wt"] == pytest.approx((WT1 + 1) / 2)
    assert m["dice_tc"] == pytest.approx((TC1 + 1) / 2)
    assert m["dice_et"] == pytest.approx((ET1 + 1) / 2)
    assert m["dice_mean"] == pytest.approx((WT1 + TC1 + ET1 + 3) / 6)
    assert set(m) == {"dice_wt", "dice_tc", "dice_et", "dice_mean", "loss"}
    # empty prediction vs non-empty truth ≈ 0
    d = task.region_dice(P2[None], T1[None])[0]
    assert d.tolist() == pytest.approx([E / (4 + E), E / (2 + E), E / (1 + E)])
    # CGGM per-batch metric: mean over regions per slice, averaged over slices (cggm.md §8 item 12)
    logits = _seg_logits(torch.stack([P1, P2]))
    num, den = task.batch_score_parts(logits, torch.stack([T1, T2]))
    assert float(den) == 2.0
    assert float(num) == pytest.approx((WT1 + TC1 + ET1) / 3 + 1.0, rel=1e-6)
    assert float(task.batch_score(logits, torch.stack([T1, T2]))) == pytest.approx(float(num / den))
    assert task.prediction(logits).tolist() == torch.stack([P1, P2]).tolist()


def test_segmentation_meter_keeps_no_logits() -> None:
    task = SegmentationTask()
    meter = task.new_meter()
    logits = torch.randn(3, 4, 16, 16)
    meter.update(logits, torch.randint(0, 4, (3, 16, 16)))
    for value in vars(meter).values():
        assert not (isinstance(value, torch.Tensor) and value.numel() >= 3 * 16 * 16)


def test_segmentation_loss_values() -> None:
    target = T1[None]
    # uniform logits: CE = ln 4 (also weighted: all terms equal); p = 1/4 on 16 px:
    #   class 1: Σp = 4, Σg = 1, Σpg = 0.25 -> (0.5 + 0.01)/(5 + 0.01)
    #   class 2: Σp = 4, Σg = 2, Σpg = 0.5  -> (1.0 + 0.01)/(6 + 0.01)
    #   class 3: as class 1
    soft = (2 * 0.51 / 5.01 + 1.01 / 6.01) / 3
    expected = 0.5 * math.log(4) + 0.5 * (1 - soft)
    uniform = torch.zeros(1, 4, 4, 4)
    assert float(SegmentationTask(4).loss(uniform, target)) == pytest.approx(expected)
    assert float(SegmentationTask(4, ce_weight=BRATS_CE_WEIGHTS).loss(uniform, target)) == pytest.approx(
        expected
    )
    # confident and correct: ≈ 0 (absent classes give soft Dice 0.01/0.01 = 1)
    assert float(SegmentationTask(4).loss(_seg_logits(target) * 3, target)) < 1e-6
    # confident and wrong: large but finite
    wrong = float(SegmentationTask(4, ce_weight=BRATS_CE_WEIGHTS).loss(_seg_logits(P2[None]), target))
    assert math.isfinite(wrong) and wrong > 1.0
    # gradient flows
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    SegmentationTask(4).loss(logits, torch.randint(0, 4, (2, 8, 8))).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_segmentation_regions_options_and_compare() -> None:
    generic = SegmentationTask(num_classes=3)
    assert generic.regions == {"dice_1": [1], "dice_2": [2]}
    custom = SegmentationTask(num_classes=4, regions={"dice_tumour": [1, 2, 3], "core": [1, 3]})
    assert list(custom.regions) == ["dice_tumour", "dice_core"]
    with pytest.raises(ConfigError):
        SegmentationTask(num_classes=4, regions={"bad": [4]})
    with pytest.raises(ConfigError):
        SegmentationTask(num_classes=4, ce_weight=[1.0, 2.0])
    assert generic.primary_metric == "dice_mean" and generic.higher_is_better
    assert generic.compare(0.7, 0.6) == 1 and generic.compare(0.6, 0.7) == -1


# ----------------------------------------------------------------------------- shared behaviour


@pytest.mark.parametrize("kind", ["classification", "regression", "segmentation"])
def test_meter_two_batches_equal_one_concatenated(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    if kind == "classification":
        task = create_task(kind, num_classes=7)
        logits, target = torch.randn(10, 7, generator=g), torch.randint(0, 7, (10,), generator=g)
    elif kind == "regression":
        task = create_task(kind)
        logits, target = torch.randn(10, 1, generator=g) * 2, torch.randn(10, generator=g) * 2
        target[3] = 0.0
    else:
        task = create_task(kind, num_classes=4)
        logits, target = torch.randn(10, 4, 6, 6, generator=g), torch.randint(0, 4, (10, 6, 6), generator=g)
    split, whole = task.new_meter(), task.new_meter()
    split.update(logits[:4], target[:4])
    split.update(logits[4:], target[4:])
    whole.update(logits, target)
    a, b = split.compute(), whole.compute()
    assert a.keys() == b.keys()
    # the segmentation loss has a batch-level soft Dice, so only its metrics add up exactly
    for key in a.keys() - ({"loss"} if kind == "segmentation" else set()):
        tol = 1e-6 if key == "loss" else 1e-12  # the task loss itself is computed in float32
        assert a[key] == pytest.approx(b[key], rel=tol, abs=tol), key
    assert all(math.isfinite(v) for v in a.values())


def test_create_task_and_errors() -> None:
    assert isinstance(create_task("regression"), RegressionTask)
    assert create_task("classification", num_classes=3).num_classes == 3
    with pytest.raises(ConfigError, match="classification, regression, segmentation"):
        create_task("detection")
    with pytest.raises(ConfigError):
        create_task("classification", num_class=3)
    with pytest.raises(ValueError):
        ClassificationTask(3).new_meter().compute()
