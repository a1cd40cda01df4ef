"""Tasks: loss, prediction, per-batch score and full-split metrics for each problem type.

A :class:`Task` turns model logits into a loss (training), a prediction, a cheap per-batch score
(CGGM's ε, ``docs/methods/cggm.md`` section 3 step 7a) and a :class:`MetricMeter` that accumulates
full-split metrics over (already gathered) evaluation batches.

Definitions (all from the dataset specs under ``docs/datasets/``):

- classification (``mfeat.md`` §8, ``iemocap.md`` §3, ``food101.md`` §5): cross-entropy; accuracy,
  macro-F1 and support-weighted F1 from the confusion matrix (per-class F1 = 2PR/(P+R), 0 when
  undefined); also ``ua`` (mean per-class recall, ``iemocap.md``) and ``acc_top5`` (``food101.md``,
  only when there are more than 5 classes).
- regression (``mosi.md`` §3): L1 loss; mae, corr, acc7, acc5, acc2_nn/f1_nn, acc2_nz/f1_nz,
  acc2_cggm/f1_cggm.
- segmentation (``brats2021.md`` §5): 0.5·CE_w + 0.5·(1 − SoftDice); per-slice region Dice with
  epsilon 1e-3 averaged over evaluation slices, dice_mean = mean over regions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.errors import ConfigError

__all__ = [
    "BRATS_CE_WEIGHTS",
    "BRATS_REGIONS",
    "ClassificationTask",
    "MetricMeter",
    "RegressionTask",
    "SegmentationTask",
    "Task",
    "TASK_NAMES",
    "create_task",
    "f1_scores",
]

#: BraTS regions after the loader's 4 → 3 label remap (``brats2021.md`` §5).
BRATS_REGIONS: dict[str, list[int]] = {"wt": [1, 2, 3], "tc": [1, 3], "et": [3]}
#: Class weights of CGGM's ``SegLoss`` cross-entropy term (``brats2021.md`` §5).
BRATS_CE_WEIGHTS: tuple[float, ...] = (0.2, 0.3, 0.25, 0.25)
#: Epsilon of the evaluation Dice (``brats2021.md`` §5) and of the soft Dice in the loss.
DICE_EPS = 1e-3
SOFT_DICE_EPS = 0.01


def f1_scores(confusion: Tensor) -> tuple[float, float]:
    """(macro-F1, support-weighted F1) from a confusion matrix ``confusion[true, pred]``.

    Per class c: P = TP/(TP+FP), R = TP/(TP+FN), F1 = 2PR/(P+R) = 2TP/(2TP+FP+FN); 0 when the
    denominator is 0 (``mfeat.md`` §8). Macro = unweighted mean over all classes; weighted = mean
    weighted by the true-class support (sklearn's ``average="weighted"``; 0 when there is no sample).
    """
    cm = confusion.to(torch.float64)
    tp = cm.diagonal()
    support = cm.sum(dim=1)
    denom = 2 * tp + (cm.sum(dim=0) - tp) + (support - tp)
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
    macro = float(f1.mean()) if f1.numel() else 0.0
    total = float(support.sum())
    weighted = float((f1 * support).sum() / total) if total > 0 else 0.0
    return macro, weighted


def _binary_confusion(pred: Tensor, true: Tensor) -> Tensor:
    """2×2 confusion matrix of two boolean vectors (rows: truth)."""
    idx = true.long() * 2 + pred.long()
    return torch.bincount(idx, minlength=4).reshape(2, 2)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


class MetricMeter:
    """Accumulates full-split metrics over batches; :meth:`compute` returns plain floats."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.n = 0
        self.loss_sum = 0.0

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add one (gathered) batch. The task loss is weighted by the batch's sample count."""
        with torch.no_grad():
            logits = logits.float()  # metrics in float32 whatever the autocast dtype
            b = int(target.shape[0])
            self.loss_sum += float(self.task.loss(logits, target)) * b
            self.n += b
            self._update(logits.detach(), target.detach())

    def _update(self, logits: Tensor, target: Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """All metrics of the task plus ``loss`` (mean task loss, sample-weighted)."""
        if self.n == 0:
            raise ValueError(f"{self.task.name} metric meter: compute() called before any update()")
        return {**self._compute(), "loss": self.loss_sum / self.n}

    def _compute(self) -> dict[str, float]:
        raise NotImplementedError


class Task:
    """Base class: loss, prediction, batch score and meter for one problem type."""

    name: str = ""
    primary_metric: str = ""
    higher_is_better: bool = True

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean scalar training loss."""
        raise NotImplementedError

    def prediction(self, logits: Tensor) -> Tensor:
        """Class index / regression value / per-pixel class map."""
        raise NotImplementedError

    def batch_score_parts(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(numerator, denominator) of :meth:`batch_score` as float32 scalars on the logits' device,
        so that a distributed caller can SUM-reduce both before dividing (``cggm.md`` §9)."""
        raise NotImplementedError

    def batch_score(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-batch score (CGGM's ε, ``cggm.md`` step 7a); not differentiable."""
        num, den = self.batch_score_parts(logits, target)
        return num / den.clamp_min(1)

    def new_meter(self) -> MetricMeter:
        raise NotImplementedError

    def compare(self, a: float, b: float) -> int:
        """+1 if ``a`` is better than ``b``, −1 if worse, 0 if equal (NaN is worse than any number)."""
        a_nan, b_nan = math.isnan(a), math.isnan(b)
        if a_nan or b_nan:
            return 0 if a_nan and b_nan else (-1 if a_nan else 1)
        if a == b:
            return 0
        return 1 if (a > b) == self.higher_is_better else -1

    def __repr__(self) -> str:
        return f"{type(self).__name__}(primary_metric={self.primary_metric!r})"

    def _on(self, key: str, t: Tensor, device: torch.device) -> Tensor:
        """``t`` (a constant of the task: class weights, region classes) on ``device``, copied there
        once and cached, not once per loss call (on a GPU each copy is a blocking host→device copy)."""
        cache = self.__dict__.setdefault("_device_copies", {})
        hit = cache.get((key, device))
        if hit is None or hit[0] is not t:
            hit = cache[(key, device)] = (t, t.to(device))
        return hit[1]


# --------------------------------------------------------------------------- classification


class ClassificationTask(Task):
    """Single-label classification: cross-entropy (``mfeat.md`` §8, ``iemocap.md`` §3, ``food101.md`` §5)."""

    name = "classification"
    primary_metric = "accuracy"
    higher_is_better = True

    def __init__(
        self,
        num_classes: int,
        class_weights: Sequence[float] | Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        if int(num_classes) < 2:
            raise ConfigError(f"classification task: num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.class_weights = (
            None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        )
        if self.class_weights is not None and self.class_weights.shape != (self.num_classes,):
            raise ConfigError(
                f"classification task: class_weights has shape {tuple(self.class_weights.shape)}, "
                f"expected ({self.num_classes},)"
            )
        self.label_smoothing = float(label_smoothing)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy in float32 (bf16/fp16 logits from autocast are upcast first, README rule 5)."""
        logits = logits.float()
        w = None if self.class_weights is None else self._on("class_weights", self.class_weights, logits.device)
        return F.cross_entropy(logits, target.long(), weight=w, label_smoothing=self.label_smoothing)

    def prediction(self, logits: Tensor) -> Tensor:
        return logits.argmax(dim=-1)

    def batch_score_parts(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Top-1 accuracy: (correct count, sample count)."""
        correct = (self.prediction(logits) == target.long()).sum().to(torch.float32)
        return correct, correct.new_full((), float(target.shape[0]))  # made on the device: no copy

    def new_meter(self) -> MetricMeter:
        return _ClassificationMeter(self)


class _ClassificationMeter(MetricMeter):
    """Keeps the confusion matrix (``self.confusion[true, pred]``) and the top-5 hit count."""

    def __init__(self, task: ClassificationTask) -> None:
        super().__init__(task)
        self.k = task.num_classes
        self.confusion = torch.zeros(self.k, self.k, dtype=torch.int64)
        self.top5 = 0

    def _update(self, logits: Tensor, target: Tensor) -> None:
        target = target.long()
        # bincount on the CPU: CUDA bincount refuses to run under deterministic algorithms
        idx = (target * self.k + logits.argmax(dim=-1)).cpu()
        self.confusion += torch.bincount(idx, minlength=self.k * self.k).reshape(self.k, self.k)
        if self.k > 5:
            top = logits.topk(5, dim=-1).indices
            self.top5 += int((top == target[:, None]).any(dim=1).sum())

    def _compute(self) -> dict[str, float]:
        cm = self.confusion
        support = cm.sum(dim=1).to(torch.float64)
        recall = cm.diagonal().to(torch.float64)[support > 0] / support[support > 0]
        macro, weighted = f1_scores(cm)
        out = {
            "accuracy": _ratio(float(cm.diagonal().sum()), float(cm.sum())),
            "f1_macro": macro,
            "f1_weighted": weighted,
            "ua": float(recall.mean()) if recall.numel() else 0.0,
        }
        if self.k > 5:
            out["acc_top5"] = _ratio(self.top5, self.n)
        return out


# --------------------------------------------------------------------------- regression


class RegressionTask(Task):
    """Scalar regression with L1 loss and the sentiment metrics of ``mosi.md`` §3."""

    name = "regression"
    primary_metric = "mae"
    higher_is_better = False

    @staticmethod
    def _flat(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Logits [B] or [B, 1] and target [B] / [B, 1] / [B, 1, 1] → two [B] vectors."""
        b = target.shape[0]
        if logits.numel() != b or target.numel() != b:
            raise ValueError(
                f"regression task: logits {tuple(logits.shape)} and target {tuple(target.shape)} "
                "must both hold one value per sample"
            )
        return logits.reshape(b), target.reshape(b)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """L1 in float32: reduced-precision predictions are upcast, targets are never rounded to them."""
        pred, y = self._flat(logits, target)
        return F.l1_loss(pred.float(), y.float())

    def prediction(self, logits: Tensor) -> Tensor:
        """The float32 value per sample (a bf16 prediction upcast, so later arithmetic is float32)."""
        return logits.reshape(logits.shape[0]).float()

    def batch_score_parts(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Sign accuracy, acc2_cggm convention: (#[(ŷ > 0) = (y > 0)], sample count)."""
        pred, y = self._flat(logits.float(), target)
        correct = ((pred > 0) == (y > 0)).sum().to(torch.float32)
        return correct, correct.new_full((), float(y.shape[0]))

    def new_meter(self) -> MetricMeter:
        return _RegressionMeter(self)


def regression_metrics(pred: Tensor, y: Tensor) -> dict[str, float]:
    """``mosi.md`` §3 metrics on float64 vectors. Deviation: corr is 0 (not NaN) when undefined;
    acc2_nz/f1_nz are 0 when every label is 0."""
    pred, y = pred.to(torch.float64), y.to(torch.float64)
    out: dict[str, float] = {"mae": float((pred - y).abs().mean())}
    pc, yc = pred - pred.mean(), y - y.mean()
    den = math.sqrt(float((pc * pc).sum()) * float((yc * yc).sum()))
    out["corr"] = float((pc * yc).sum()) / den if den > 0 else 0.0
    for name, lim in (("acc7", 3.0), ("acc5", 2.0)):
        # torch.round rounds half to even, like NumPy.
        out[name] = float((pred.clamp(-lim, lim).round() == y.clamp(-lim, lim).round()).double().mean())
    nz = y != 0
    for name, p_bin, y_bin in (
        ("nn", pred >= 0, y >= 0),
        ("nz", pred[nz] > 0, y[nz] > 0),
        ("cggm", pred > 0, y > 0),
    ):
        out[f"acc2_{name}"] = float((p_bin == y_bin).double().mean()) if y_bin.numel() else 0.0
        out[f"f1_{name}"] = f1_scores(_binary_confusion(p_bin, y_bin))[1]
    return out


class _RegressionMeter(MetricMeter):
    """Keeps the float64 predictions and labels (one value per sample) on the CPU."""

    def __init__(self, task: RegressionTask) -> None:
        super().__init__(task)
        self.preds: list[Tensor] = []
        self.targets: list[Tensor] = []

    def _update(self, logits: Tensor, target: Tensor) -> None:
        pred, y = RegressionTask._flat(logits, target)
        self.preds.append(pred.to("cpu", torch.float64))
        self.targets.append(y.to("cpu", torch.float64))

    def _compute(self) -> dict[str, float]:
        return regression_metrics(torch.cat(self.preds), torch.cat(self.targets))


# --------------------------------------------------------------------------- segmentation


class SegmentationTask(Task):
    """Per-pixel segmentation with CGGM's ``SegLoss`` and region Dice (``brats2021.md`` §5).

    ``regions`` maps a region name to its set of classes; metric names are ``dice_<name>`` (a name
    already starting with ``dice_`` is kept). Default: the BraTS regions WT/TC/ET when
    ``num_classes == 4``, otherwise one region per foreground class (``cggm.md`` §5).
    ``ce_weight`` defaults to unweighted CE; BraTS passes :data:`BRATS_CE_WEIGHTS`.
    """

    name = "segmentation"
    primary_metric = "dice_mean"
    higher_is_better = True

    def __init__(
        self,
        num_classes: int = 4,
        regions: Mapping[str, Sequence[int]] | None = None,
        ce_weight: Sequence[float] | Tensor | None = None,
    ) -> None:
        self.num_classes = int(num_classes)
        if self.num_classes < 2:
            raise ConfigError(f"segmentation task: num_classes must be >= 2, got {num_classes}")
        if regions is None:
            regions = (
                BRATS_REGIONS if self.num_classes == 4 else {str(c): [c] for c in range(1, self.num_classes)}
            )
        if not regions:
            raise ConfigError("segmentation task: regions must not be empty")
        self.regions: dict[str, list[int]] = {}
        for key, classes in regions.items():
            classes = [int(c) for c in classes]
            if not classes or any(c < 0 or c >= self.num_classes for c in classes):
                raise ConfigError(
                    f"segmentation task: region {key!r} has classes {classes}; expected a non-empty "
                    f"subset of 0..{self.num_classes - 1}"
                )
            self.regions[key if key.startswith("dice_") else f"dice_{key}"] = classes
        self.ce_weight = None if ce_weight is None else torch.as_tensor(ce_weight, dtype=torch.float32)
        if self.ce_weight is not None and self.ce_weight.shape != (self.num_classes,):
            raise ConfigError(
                f"segmentation task: ce_weight has shape {tuple(self.ce_weight.shape)}, "
                f"expected ({self.num_classes},)"
            )

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """L = 0.5·CE_w + 0.5·(1 − SoftDice); SoftDice = mean over foreground classes c of
        (2Σp_c·g_c + 0.01)/(Σp_c + Σg_c + 0.01), sums over all pixels of the batch."""
        logits = logits.float()
        target = target.long()
        w = None if self.ce_weight is None else self._on("ce_weight", self.ce_weight, logits.device)
        ce = F.cross_entropy(logits, target, weight=w)
        p = logits.softmax(dim=1)[:, 1:]
        g = F.one_hot(target, self.num_classes).permute(0, 3, 1, 2)[:, 1:].to(p.dtype)
        inter = (p * g).sum(dim=(0, 2, 3))
        dice = (2 * inter + SOFT_DICE_EPS) / (p.sum(dim=(0, 2, 3)) + g.sum(dim=(0, 2, 3)) + SOFT_DICE_EPS)
        return 0.5 * ce + 0.5 * (1 - dice.mean())

    def prediction(self, logits: Tensor) -> Tensor:
        return logits.argmax(dim=1)

    def region_dice(self, pred: Tensor, target: Tensor) -> Tensor:
        """[B, R] per-slice Dice (2|P∩G| + 1e-3)/(|P| + |G| + 1e-3) of class maps [B, H, W]."""
        cols = []
        for key in self.regions:
            c = self._on(key, self._region_classes(key), pred.device)
            p, g = torch.isin(pred, c), torch.isin(target, c)
            inter = (p & g).sum(dim=(1, 2)).double()
            size = p.sum(dim=(1, 2)).double() + g.sum(dim=(1, 2)).double()
            cols.append((2 * inter + DICE_EPS) / (size + DICE_EPS))
        return torch.stack(cols, dim=1)

    def batch_score_parts(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Mean region Dice per slice: (sum over slices, slice count) (``cggm.md`` step 7a)."""
        per_slice = self.region_dice(self.prediction(logits), target.long()).mean(dim=1)
        total = per_slice.sum().to(torch.float32)
        return total, total.new_full((), float(target.shape[0]))

    def _region_classes(self, key: str) -> Tensor:
        """The classes of region ``key`` as a CPU tensor (built once)."""
        cache = self.__dict__.setdefault("_region_tensors", {})
        if key not in cache or cache[key][0] != self.regions[key]:
            cache[key] = (list(self.regions[key]), torch.tensor(self.regions[key]))
        return cache[key][1]

    def new_meter(self) -> MetricMeter:
        return _SegmentationMeter(self)


class _SegmentationMeter(MetricMeter):
    """Keeps only the per-region sums of per-slice Dice (never the logits)."""

    def __init__(self, task: SegmentationTask) -> None:
        super().__init__(task)
        self.dice_sum = torch.zeros(len(task.regions), dtype=torch.float64)

    def _update(self, logits: Tensor, target: Tensor) -> None:
        task: SegmentationTask = self.task  # type: ignore[assignment]
        self.dice_sum += task.region_dice(task.prediction(logits), target.long()).sum(dim=0).cpu()

    def _compute(self) -> dict[str, float]:
        means = self.dice_sum / self.n
        out = {name: float(v) for name, v in zip(self.task.regions, means)}  # type: ignore[attr-defined]
        out["dice_mean"] = float(means.mean())
        return out


# --------------------------------------------------------------------------- factory

_TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "regression": RegressionTask,
    "segmentation": SegmentationTask,
}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def create_task(name: str, **kwargs: object) -> Task:
    """Build a task by name (``classification`` | ``regression`` | ``segmentation``)."""
    try:
        cls = _TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; valid names: {', '.join(TASK_NAMES)}") from None
    try:
        return cls(**kwargs)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError(f"task {name!r}: invalid arguments {sorted(kwargs)} ({exc})") from None
