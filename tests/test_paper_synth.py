"""Every registered method (presets included) one epoch on each SYNTHETIC shape-alike of the four paper
datasets (mosi-synth, iemocap-synth, food101-synth, brats-synth): same shapes, task and canonical model as
the real data, at the smallest sizes the generators allow. A method × dataset pair either runs (finite
losses, the three run files, finite test metrics) or is a documented "not applicable" listed in
``NOT_APPLICABLE`` with the reason the method gives; anything else fails and names the pair.

Also: the per-modality heads QMF, G-Blending and ReconBoost use on BraTS are the dataset's one-input
DeepLabV3+ decoder (not a 1×1 conv), with logits at the label resolution.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from mmbalance.registry import list_methods
from mmbalance.testing import build_trainer, first_batch

#: the smallest sizes the generators accept, short sequences and tiny images
SYNTH = {
    "mosi-synth": {"dataset.n_samples": 20, "dataset.seq_len": 4},
    "iemocap-synth": {"dataset.n_samples": 40, "dataset.seq_len": 4},
    "food101-synth": {"dataset.n_samples": 40, "dataset.num_classes": 4, "dataset.image_tokens": 3,
                      "dataset.text_tokens": 3},
    "brats-synth": {"dataset.n_samples": 20, "dataset.image_size": 16},
}
#: one or two steps per epoch, one evaluation batch
TRAIN = {"train.batch_size": 8, "train.max_steps_per_epoch": 2, "train.eval_batch_size": 64, "train.modality_eval": "final"}
UNIMODAL = {"mosi-synth": "text", "iemocap-synth": "audio", "food101-synth": "image", "brats-synth": "t1ce"}
#: (method, dataset) → a phrase of the reason the method gives
NOT_APPLICABLE = {
    ("pmr", "mosi-synth"): "does not support regression",
    ("pmr_paper", "mosi-synth"): "does not support regression",
    ("relearning", "brats-synth"): "does not support segmentation",
    ("arl", "mosi-synth"): "regression output has none",
    ("mmcosine", "mosi-synth"): "does not support regression",
    ("mbsd", "mosi-synth"): "does not support regression",
    ("lfm", "mosi-synth"): "a regression output has none",
    ("lfm_learnable", "mosi-synth"): "a regression output has none",
    ("cml", "mosi-synth"): "no predictive confidence",
    ("midas", "mosi-synth"): "a regression target has neither",
    ("midas", "brats-synth"): "unregistered anatomy",
    ("amco", "mosi-synth"): "does not support regression",
    ("amco_bb", "mosi-synth"): "does not support regression",
    ("amco_bb", "iemocap-synth"): "needs a concat-linear head",
    ("amco_bb", "food101-synth"): "needs a concat-linear head",
    ("amco_bb", "brats-synth"): "needs a concat-linear head",
}
#: models Greedy must switch to (its MMTM variants of the canonical models)
GREEDY_MODEL = {"mosi-synth": "msa_mmtm", "iemocap-synth": "msa_mmtm", "food101-synth": "msa_mmtm",
                "brats-synth": "deeplab_mmtm"}


def _sets(method: str, dataset: str) -> tuple[dict, int]:
    """Per-method budget knobs: one ReconBoost stage (its smallest unit of training), one-epoch
    G-Blending estimates (paper default: 10)."""
    sets, epochs = {**SYNTH[dataset], **TRAIN}, 1
    if method == "reconboost_official_schedule":  # 4 + 4 epochs per stage
        sets["max_stages"], epochs = 1, 8
    elif method.startswith("reconboost"):
        sets.update({"e1": 1, "e2": 1})
        epochs = 2
    if method.startswith("gblending"):
        sets.update({"first_super_epoch": 1, "super_epoch": 1})
    return sets, epochs


def _cases() -> list:
    out = []
    for dataset in SYNTH:
        for method in list_methods():
            name = f"unimodal:{UNIMODAL[dataset]}" if method == "unimodal" else method
            out.append(pytest.param(name, dataset, id=f"{name}-{dataset}"))
    return out


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory):
    """One output dir for the methods that use the shared ``<m>-only`` models (UMT, UME, G2D, ...): each
    dataset's teachers are trained once for all of them (the cache is keyed by content and locked)."""
    return tmp_path_factory.mktemp("synth_teachers")


@pytest.mark.parametrize("method,dataset", _cases())
def test_method_runs_one_epoch_on_paper_shape_alike(method, dataset, tmp_path, capsys, teacher_cache):
    from mmbalance.run import main
    from mmbalance.testing import cli_args

    rd = tmp_path / "run"
    sets, epochs = _sets(method, dataset)
    code = main(cli_args(method, dataset, epochs=epochs, run_dir=rd, sets=sets, extra=["--output-dir", str(teacher_cache)]))
    err = capsys.readouterr().err
    reason = NOT_APPLICABLE.get((method, dataset))
    if reason is not None:
        assert code == 2 and "not applicable" in err and reason in err, err
        assert not rd.exists()
        return
    assert code == 0, f"{method} on {dataset}: exit {code}: {err[-2000:]}"
    result = json.loads((rd / "result.json").read_text())
    config = json.loads((rd / "config.json").read_text())
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert result["status"] == "ok" and len(rows) == epochs
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    assert result["primary_metric"] in result["test"]
    assert all(math.isfinite(v) for v in result["test"].values() if isinstance(v, float))
    if method.startswith("greedy"):
        assert config["model_resolved"]["name"] == GREEDY_MODEL[dataset]


# ---------------------------------------------------------------- BraTS per-modality heads
#: one-input DeepLabV3+ decoder of the tiny brats-synth model, counted by hand: ASPP width a = 16, layer1
#: width l = 8, reduction r = 8, decoder width w = 16, C = 4 classes:
#: reduce 1×1 l→r (no bias) + BN(r): 64 + 16; 3×3 (a + r)→w (no bias) + BN(w): 3456 + 32;
#: 3×3 w→w + BN(w): 2304 + 32; final 1×1 w→C with bias: 68.
TINY_DECODER_PARAMS = 64 + 16 + 3456 + 32 + 2304 + 32 + 68  # 5972
#: the 1×1-conv heads they replaced: (a + l)·C + C
PIXEL_HEAD_PARAMS = (16 + 8) * 4 + 4  # 100


def _n(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _brats_trainer(method: str, tmp_path):
    sets, epochs = _sets(method, "brats-synth")
    return build_trainer(method, "brats-synth", run_dir=tmp_path / method, epochs=epochs,
                         sets={**sets, "train.modality_eval": "none"})


@pytest.mark.parametrize("method", ["qmf", "gblending", "reconboost"])
def test_brats_method_heads_are_the_datasets_decoder(method, tmp_path):
    tr = _brats_trainer(method, tmp_path)
    ctx = tr.ctx
    batch = first_batch(tr)
    y = batch["label"]
    if method == "reconboost":  # one head H shared by every modality (reconboost.md §5)
        heads = {m: ctx.raw_model.head for m in ctx.modalities}
    else:
        key = "qmf_heads" if method == "qmf" else "gb_heads"
        heads = dict(ctx.accelerator.unwrap_model(ctx.modules[key]).heads)
    assert set(heads) == set(ctx.modalities)
    feats = ctx.raw_model(ctx.inputs(batch)).features
    for m, head in heads.items():
        assert _n(head) == TINY_DECODER_PARAMS, (m, _n(head))
        assert _n(head) > 50 * PIXEL_HEAD_PARAMS
        assert feats[m].shape[-2:] == (4, 4)  # z_m at 1/4 of the 16×16 input …
        assert head(feats[m]).shape == (len(y), 4, *y.shape[-2:])  # … logits at the label size


def test_reconboost_boost_step_on_brats_weights_pixels(tmp_path):
    """Phase 1 on feature maps (reconboost.md §5): per-pixel agreement s and weights a, logits at label size,
    finite loss and a gradient in the boosted modality's encoder only."""
    tr = _brats_trainer("reconboost", tmp_path)
    ctx, meth = tr.ctx, tr.method
    ctx.phase_index = 0  # s0_boost_flair
    batch = first_batch(tr)
    out = meth.training_step(ctx, batch)
    assert torch.isfinite(out.loss)
    assert out.output.fused.shape == (len(batch["label"]), 4, 4, 16, 16)
    out.loss.backward()
    model = ctx.raw_model
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders["flair"].parameters())
    assert all(p.grad is None for m in ("t1ce", "t1", "t2") for p in model.encoders[m].parameters())
