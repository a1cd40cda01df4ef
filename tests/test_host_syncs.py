"""Host syncs per training step (issue 14 goal: at most 2 per step for every method): the counter of
``mmbalance/hostsyncs.py`` (also ``benchmarks/host_syncs.py``) on tiny mfeat runs, and the counter's own
device model (which reads a GPU would pay as a sync)."""
from __future__ import annotations

import pytest
import torch

from mmbalance.hostsyncs import Counts, DeviceTracker, count_host_syncs

TINY = {"dataset.limit_per_class": 6, "train.batch_size": 12}
# Device reads allowed inside the training steps, per step (a host decision the algorithm needs: Greedy's
# next-step mode from the learning speeds). Everything else reads nothing per step.
BUDGET = {"baseline": 0, "gblending": 0, "gblending_offline_robust": 0, "pmr": 0, "pmr_paper": 0, "qmf": 0,
          "qmf_rgbd": 0, "mla": 0, "mla_alternate": 0, "mmpareto": 0, "greedy": 1, "greedy_random": 1, "ogm_ge": 0,
          "umt": 0, "inforeg_official": 0, "remix": 0, "mrd": 0, "cggm": 0, "cggm_paper": 0, "agm": 0, "opm": 0,
          "arl": 0, "arl_released": 0, "mmcosine": 0, "mbsd": 0, "smv": 0, "smv_modality": 0, "lfm": 0,
          "lfm_learnable": 0, "cml": 0, "masam": 0, "masam_static": 0, "amco": 0, "amco_bb": 0, "g2d": 0,
          "g2d_no_smp": 0, "aug": 0, "aug_released": 0, "midas": 0}
# Settings under which a method's per-step work is active in a 1-epoch run (no warm-up).
ACTIVE = {"opm": {"warmup_epochs": 0}, "arl": {"start": -1}, "arl_released": {"start": -1}, "smv": {"warmup_epochs": 0},
          "smv_modality": {"warmup_epochs": 0}, "midas": {"warmup_epochs": 0}}
# Host→device copies allowed per step: MRD's drop mask is drawn on the CPU generator (one copy per step).
H2D = {"mrd": 1}


@pytest.mark.parametrize("method", list(BUDGET))
def test_training_steps_stay_within_the_host_sync_budget(method):
    rep = count_host_syncs(method, "mfeat", epochs=1, sets={**TINY, **ACTIVE.get(method, {})})
    assert rep is not None and rep.steps >= 4
    steps = rep.in_steps
    assert steps.total("device") <= BUDGET[method] * rep.steps, steps.where.most_common(5)
    assert steps.total("reads") <= 2 * rep.steps, steps.reads  # host reads included
    # no host→device copy per step either; one per epoch: the loader's shuffled order, copied as it starts
    assert steps.total("h2d") <= H2D.get(method, 0) * rep.steps + 1, steps.where.most_common(5)


def _tracked(fn):
    tracker = DeviceTracker()
    tracker.dev = torch.device("cpu")
    w = Counts()
    with tracker:
        tracker.windows.append(w)
        fn(tracker)
    return w


def test_counter_tells_device_reads_from_host_reads():
    def body(tr):
        model = torch.nn.Linear(3, 2)
        tr.tag_module(model)
        loss = model(torch.ones(4, 3)).pow(2).mean()  # computed from a device parameter: on the device
        float(loss)  # device read
        loss.backward()
        model.weight.grad.norm().item()  # .grad of a device parameter: device read
        host = torch.tensor([1.0, 2.0])  # Python data, no device: host bookkeeping
        float(host.sum())
        host.tolist()  # host reads
        on_dev = torch.zeros(2, device=tr.dev)  # created on ctx.device: on the device, no copy
        moved = torch.arange(3.0).to(tr.dev)  # host → device copy
        float(on_dev.sum() + moved.sum())  # device read
        torch.tensor([1.0, 2.0], device=loss.device)  # x.device of a device tensor is the device: a copy
        back = loss.detach().cpu()  # device → host copy: one device read ...
        float(back)  # ... and the value is then on the host
        buf = torch.zeros(2)
        buf[0] = loss.detach()  # a device value written into a host tensor: a sync
        out = model(torch.ones(4, 3)).detach()
        out[out > 0]  # boolean-mask indexing: the output size is a device value (a sync, no conversion)
        out.nonzero()  # likewise
        out[out > 0] = 0.0  # a masked fill: no sync
        out[torch.tensor([0, 1])]  # integer indexing: no sync
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # its per-device groups stay on the device
    w = _tracked(body)
    assert w.device == {"__float__": 2, "item": 1, "cpu": 1, "__setitem__": 1, "__getitem__": 1, "nonzero": 1}, w.device
    assert w.host == {"__float__": 2, "tolist": 1}, w.host
    assert w.h2d == {"to": 1, "tensor": 1}, w.h2d
    assert w.total("reads") == 6  # every conversion, whatever the device (the former single count)


def test_planted_per_step_read_is_caught(monkeypatch):
    """A method that reads its loss on the host every step (the bug the budget exists for) is caught."""
    from mmbalance.methods.qmf import QMF

    real = QMF.training_step

    def reading(self, ctx, batch):
        out = real(self, ctx, batch)
        out.logs["qmf/loss_read"] = float(out.loss)
        return out

    monkeypatch.setattr(QMF, "training_step", reading)
    rep = count_host_syncs("qmf", "mfeat", epochs=1, sets=TINY)
    assert rep.in_steps.total("device") == rep.steps
    assert rep.in_steps.where.most_common(1)[0][0].startswith("device __float__ tests/test_host_syncs.py")


def test_segmentation_pixel_draws_are_made_on_the_device():
    """PMR on segmentation samples pixels every step: from ``ctx.device_generator`` on the device (on the
    CPU that generator is ``ctx.generator``, so the numbers are those of a CPU draw), not drawn on the
    CPU and copied per step."""
    rep = count_host_syncs("pmr", "synthetic", epochs=1, sets={
        "dataset.n_samples": 40, "train.batch_size": 8, "train.max_steps_per_epoch": 3, "dataset.task": "segmentation",
        "pixels_per_image": 16})
    assert rep.steps == 3
    assert rep.in_steps.total("device") == 0, rep.in_steps.where.most_common(3)
    assert rep.in_steps.total("h2d") <= 1, rep.in_steps.where.most_common(3)


def test_device_generator_is_the_method_generator_on_the_cpu(tmp_path):
    from mmbalance.testing import build_trainer

    ctx = build_trainer("baseline", "mfeat", run_dir=tmp_path / "r", epochs=1, sets=TINY).ctx
    assert ctx.device_generator is ctx.generator


def test_sequence_model_positions_are_not_copied_every_step():
    """The MulT sequence model's sinusoidal position table is built once per shape on the device (it
    was built on the CPU and copied for every modality in every forward)."""
    rep = count_host_syncs("baseline", "mosi-synth", epochs=1, sets={"dataset.n_samples": 60, "dataset.seq_len": 8,
                                                                "train.batch_size": 16, "train.max_steps_per_epoch": 3})
    assert rep.steps == 3
    assert rep.in_steps.total("device") == 0, rep.in_steps.where.most_common(3)
    assert rep.in_steps.total("h2d") <= 1 + 3, rep.in_steps.where.most_common(3)  # + one table per modality
