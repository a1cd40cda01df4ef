"""Issue-10 method defects, each with the test that would have caught it (independent oracles)."""
from __future__ import annotations

import pytest
import torch
from conftest import SMALL_MFEAT

from mmbalance.testing import build_trainer


# ------------------------------------------------------------------------------------------- CGGM
@pytest.mark.parametrize("cos_source", ["weights_stale", "grads_same_step"])
@pytest.mark.parametrize("rho_in_b", [False, True])
def test_cggm_magnitude_factor_is_rho_times_b_in_every_combination(tmp_path, cos_source, rho_in_b):
    """Eq. 8-9: encoder m's gradient × ρ·B_m (ρ inside B^p or outside: the same factor); B by hand from
    the classifiers' first-step accuracies (ε⁰ = 0, so Δ = ε)."""
    rho = 2.0
    tr = build_trainer("cggm", run_dir=tmp_path / "r", epochs=1,
                       sets={**SMALL_MFEAT, "train.max_steps_per_epoch": 1, "rho": rho, "lam": 0.1,
                             "cos_source": cos_source, "rho_in_b": rho_in_b})
    meth, mods = tr.method, tr.ctx.modalities
    seen = {}
    real = meth.after_backward

    def spy(ctx):
        y = first_labels
        seen["eps"] = torch.tensor([(meth._last_aux[m].argmax(-1) == y).double().mean().item() for m in mods])
        seen["raw"] = {m: [p.grad.clone() for p in meth._scoped[m]] for m in mods}
        real(ctx)
        seen["after"] = {m: [p.grad.clone() for p in meth._scoped[m]] for m in mods}

    first_labels = next(iter(tr.loader_train))["label"]
    meth.after_backward = spy
    tr.fit()
    eps = seen["eps"]
    s = eps.sum()
    assert abs(float(s)) > 1e-3  # the guard does not fire on this batch
    for k, m in enumerate(mods):
        want = rho * float((s - eps[k]) / s)
        for g0, g1 in zip(seen["raw"][m], seen["after"][m]):
            torch.testing.assert_close(g1, want * g0, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------- G-Blending
def test_gblending_noise_floor_keeps_a_noise_dominated_head_from_taking_all_the_weight():
    """The published G/O² weights collapse when one head's ΔO is ≈ 0 by chance (issue case: ΔO −0.0005,
    bootstrap SD 0.106): that head gets ~all the loss. With O² + SE² the weights stay balanced."""
    from mmbalance.methods.gblending import blend_weights

    g = torch.tensor([0.05, 0.04, 0.06], dtype=torch.float64)
    o = torch.tensor([-0.0005, 0.10, 0.12], dtype=torch.float64)
    se = torch.tensor([0.106, 0.10, 0.11], dtype=torch.float64)
    paper = blend_weights(g, o)
    assert float(paper[0]) > 0.99  # the collapse, as published
    robust = blend_weights(g, o, o_se=se)
    # by hand: w̃ = G/(O² + SE² + 1e-8)
    raw = torch.tensor([0.05 / (0.0005 ** 2 + 0.106 ** 2 + 1e-8), 0.04 / (0.01 + 0.01 + 1e-8),
                        0.06 / (0.0144 + 0.0121 + 1e-8)], dtype=torch.float64)
    torch.testing.assert_close(robust, raw / raw.sum(), rtol=1e-9, atol=1e-12)
    assert float(robust.max()) < 0.6  # 0.51 / 0.23 / 0.26
    # without noise (SE = 0) the variant is the published formula
    torch.testing.assert_close(blend_weights(g, o, o_se=torch.zeros(3)), paper)


def test_gblending_weight_cap():
    from mmbalance.methods.gblending import blend_weights, cap_weights

    w = cap_weights(torch.tensor([0.9, 0.06, 0.04]), 0.5)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))  # excess 0.4 shared 3:2
    w = cap_weights(torch.tensor([0.7, 0.25, 0.05]), 0.4)  # 2nd pass: 0.25 → 0.25·0.6/0.3 = 0.5 > 0.4
    torch.testing.assert_close(w, torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64))
    torch.testing.assert_close(cap_weights(torch.tensor([0.2, 0.3, 0.5]), 0.6), torch.tensor([0.2, 0.3, 0.5],
                                                                                           dtype=torch.float64))
    w = blend_weights(torch.tensor([0.05, 0.04, 0.06]), torch.tensor([-0.0005, 0.1, 0.12]), max_weight=0.6)
    assert abs(float(w[0]) - 0.6) < 1e-12 and abs(float(w.sum()) - 1) < 1e-12


def test_gblending_overfit_standard_error_matches_the_bootstrap():
    """Oracle: the bootstrap SD of ΔO (resample V and T′ with replacement, 4000 times)."""
    from mmbalance.methods.gblending import overfit_standard_error

    g = torch.Generator().manual_seed(0)
    v0, t0 = torch.rand(110, generator=g), torch.rand(110, generator=g)
    v1, t1 = v0 + 0.3 * torch.randn(110, generator=g), t0 - 0.1 + 0.2 * torch.randn(110, generator=g)
    se = overfit_standard_error(v0, v1, t0, t1)
    iv = torch.randint(0, 110, (4000, 110), generator=g)
    it = torch.randint(0, 110, (4000, 110), generator=g)
    boot = ((v1 - v0)[iv].mean(1) - (t1 - t0)[it].mean(1)).std()
    assert abs(se / float(boot) - 1) < 0.05


def test_gblending_offline_robust_preset_uses_the_floor(tmp_path):
    """The preset runs end to end, logs SE(O) and its weights follow the noise-aware formula."""
    from mmbalance.methods.gblending import blend_weights

    tr = build_trainer("gblending_offline_robust", run_dir=tmp_path / "r", epochs=1,
                       sets={**SMALL_MFEAT, "train.max_steps_per_epoch": 2, "train.modality_eval": "none"})
    assert tr.method.hp.mode == "offline" and tr.method.hp.noise_floor
    tr.fit()
    h = tr.method.history[0]
    assert all(s > 0 for s in h["O_se"])
    want = blend_weights(torch.tensor(h["G"]), torch.tensor(h["O"]), o_se=torch.tensor(h["O_se"]))
    torch.testing.assert_close(torch.tensor(h["w"], dtype=torch.float64), want)


# -------------------------------------------------------------------------------------------- UMT
SMALL_BRATS = {"dataset.n_samples": 20, "train.max_steps_per_epoch": 1, "train.modality_eval": "none"}


def _umt_trainer(tmp_path, sets=None):
    from mmbalance.engine import Trainer
    from mmbalance.run import build_parser, resolve
    from mmbalance.testing import cli_args

    argv = cli_args("umt", "brats-synth", epochs=1, sets={**SMALL_BRATS, **(sets or {})})
    config, train_cfg, data, meth, rdir = resolve(build_parser().parse_args(argv + ["--output-dir", str(tmp_path)]))
    return Trainer(config, train_cfg, data, meth, rdir, quiet=True)


def test_umt_on_feature_maps_sums_one_mse_per_fused_tensor(tmp_path):
    """umt.md §2: BraTS distils the ASPP output and the layer1 features, Σ_j MSE_j — not one MSE over
    their channel concatenation (which is the channel-weighted MEAN of the two)."""
    tr = _umt_trainer(tmp_path)
    ctx = tr.ctx
    batch = next(iter(tr.loader_train))
    with torch.no_grad():
        out = ctx.forward(batch)
        got = tr.method.distill_loss(ctx, batch, out.features)
        want = 0.0
        for m in ctx.modalities:
            enc = ctx.modules[f"umt_teacher_{m}"].encoders[m]
            a = enc.aspp_channels
            t = enc(batch[m])
            z = out.features[m]
            assert z.shape[1] > a  # both parts present
            want += ((z[:, :a] - t[:, :a]) ** 2).mean() + ((z[:, a:] - t[:, a:]) ** 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_umt_teachers_run_under_the_students_autocast(tmp_path):
    tr = _umt_trainer(tmp_path / "bf16", {"train.mixed_precision": "bf16"})
    ctx = tr.ctx
    dtypes = []
    for m in ctx.modalities:
        ctx.modules[f"umt_teacher_{m}"].encoders[m].register_forward_hook(lambda mod, i, o: dtypes.append(o.dtype))
    batch = next(iter(tr.loader_train))
    out = ctx.forward(batch)
    assert out.features[ctx.modalities[0]].dtype == torch.bfloat16
    loss = tr.method.distill_loss(ctx, batch, out.features)
    assert dtypes and all(d == torch.bfloat16 for d in dtypes) and loss.dtype == torch.float32


# ------------------------------------------------------------------------- engine: what is clipped
def test_heads_in_the_main_optimizer_are_clipped_with_the_model(tmp_path):
    """G-Blending's unimodal heads join the main optimizer: one clip norm over model + heads (as the
    official codes clip model.parameters() with the heads inside). CGGM's own-optimizer classifiers are
    not clipped (cggm.md step 8). Oracle: plain SGD, Δθ = −lr·g·min(1, c/‖g‖) by hand."""
    lr, clip = 1.0, 0.05  # updates well above float32 rounding of the weights
    plain = {**SMALL_MFEAT, "train.max_steps_per_epoch": 1, "train.momentum": 0.0, "train.weight_decay": 0.0,
             "train.grad_clip": clip, "train.lr": lr, "train.modality_eval": "none"}
    tr = build_trainer("gblending", run_dir=tmp_path / "gb", epochs=1, sets={**plain, "weights": [1, 1, 1, 1]})
    model = list(tr.ctx.raw_model.parameters())
    heads = list(tr.ctx.extra["gb_heads"].module.parameters())
    grads, before = {}, [p.detach().clone() for p in model + heads]
    real = tr.method.after_backward

    def spy(ctx):
        real(ctx)
        grads["g"] = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model + heads]
    tr.method.after_backward = spy
    tr.fit()
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads["g"]))
    scale = min(1.0, clip / (float(norm) + 1e-6))
    assert scale < 0.5  # the clip is active
    for p, b, g in zip(model + heads, before, grads["g"]):
        torch.testing.assert_close(p.detach() - b, -lr * scale * g, rtol=1e-3, atol=2e-8)

    tr = build_trainer("cggm", run_dir=tmp_path / "cggm", epochs=1, sets={**plain, "cls_weight_decay": 0.0})
    cls = list(tr.ctx.extra["cggm_classifiers"].module.parameters()) if "cggm_classifiers" in tr.ctx.extra else \
        [p for ex in tr.ctx.extra.values() for p in ex.module.parameters()]
    opt_lr = tr.ctx.extra[next(iter(tr.ctx.extra))].optimizer.param_groups[0]["lr"]
    before = [p.detach().clone() for p in cls]
    real = tr.method.after_backward

    def spy2(ctx):
        real(ctx)
        grads["c"] = [p.grad.clone() for p in cls]
    tr.method.after_backward = spy2
    tr.fit()
    for p, b, g in zip(cls, before, grads["c"]):
        torch.testing.assert_close(p.detach() - b, -opt_lr * g, rtol=1e-3, atol=2e-8)  # unclipped


# -------------------------------------------------------------------------------------------- AGM
def test_agm_feature_mean_uses_earlier_batches_only(tmp_path):
    """absent=feature_mean: an absent modality is replaced by the mean encoder output of the PREVIOUS
    batches (like S̄, agm.md step 6), never one holding the current samples; step 1 has none (zero input)."""
    tr = build_trainer("agm", run_dir=tmp_path / "r", epochs=1,
                       sets={**SMALL_MFEAT, "absent": "feature_mean", "train.max_steps_per_epoch": 2,
                             "train.modality_eval": "none", "model.dropout": 0.0})
    meth = tr.method
    feats, used = [], []
    real_passes, real_mean = meth.coalition_logits, meth._feature_mean  # the step's coalition passes

    def passes(ctx, batch, masks, full):
        feats.append({m: z.detach().double().clone() for m, z in full.features.items()})
        return real_passes(ctx, batch, masks, full)

    def mean(m, z):
        out = real_mean(m, z)
        used.append((len(feats), m, out[0].detach().double().clone()))
        return out

    meth.coalition_logits, meth._feature_mean = passes, mean
    tr.fit()
    assert len(feats) == 2
    assert not [u for u in used if u[0] == 1]  # first step: no earlier batch, no mean used
    step2 = [u for u in used if u[0] == 2]
    assert {m for _, m, _ in step2} == set(tr.ctx.modalities)
    for _, m, got in step2:
        torch.testing.assert_close(got, feats[0][m].mean(0), rtol=1e-5, atol=1e-6)  # batch 1 only


# ----------------------------------------------------------------------------------------- OGM-GE
@pytest.mark.parametrize("source", ["pre", "post"])
def test_ogm_ge_noise_same_cpu_numbers_and_no_host_sync(monkeypatch, source):
    """GE noise drawn where the gradient lives with σ kept on the device: on CPU the numbers are the
    published formula g·k + ξ·(std + 1e-8) with ξ from the same-seeded generator (by hand), and the
    edit makes no host sync (no float()/item() per tensor)."""
    from mmbalance.methods.ogm_ge import modulate_gradients
    from torch import nn

    torch.manual_seed(0)
    grads = [torch.randn(7, 5), torch.randn(3), torch.randn(1)]  # a 1-element tensor: σ = 0
    ps = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    k = 0.7
    ref_gen = torch.Generator().manual_seed(11)
    want = []
    for g in grads:
        base = g * k
        sd = 0.0 if g.numel() < 2 else float((g if source == "pre" else base).std())
        xi = torch.randn(g.shape, generator=ref_gen, dtype=torch.float32)
        want.append(base + xi * (sd + 1e-8))

    def no_sync(*a, **kw):
        raise AssertionError("host sync in the GE edit")
    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(torch.Tensor, "__float__", no_sync)
    n = modulate_gradients({"a": ps}, {"a": k}, ge=True, generator=torch.Generator().manual_seed(11),
                           noise_std_source=source)
    monkeypatch.undo()
    assert n == 3
    for p, w in zip(ps, want):
        assert torch.equal(p.grad, w)


# -------------------------------------------------------------------------------------------- PMR
def test_pmr_brats_prototypes_are_class_means_of_the_aspp_output(tmp_path):
    """pmr.md §5: BraTS prototypes pool the ASPP output only (not ASPP + layer1). Oracle: masked class
    means of encoder_m(x)[:, :C_aspp] by hand on one fixed batch (labels nearest-downsampled)."""
    import torch.nn.functional as F

    tr = build_trainer("pmr", "brats-synth", run_dir=tmp_path / "r", epochs=1, sets=SMALL_BRATS)
    ctx, meth = tr.ctx, tr.method
    batch = next(iter(tr.loader_train))
    meth._subset_batches = lambda ctx: iter([batch])
    protos = meth.compute_prototypes(ctx)
    model = ctx.raw_model
    model.eval()
    with torch.no_grad():
        for j, m in enumerate(ctx.modalities):
            a = model.encoders[m].aspp_channels
            z = model.encoders[m](batch[m])[:, :a].double()
            lab = F.interpolate(batch["label"][:, None].float(), size=z.shape[-2:], mode="nearest")[:, 0].long()
            for c in range(4):
                mask = lab == c
                if mask.any():
                    want = z.permute(0, 2, 3, 1)[mask].mean(0)
                    torch.testing.assert_close(protos[j, c, :a].double(), want, rtol=1e-4, atol=1e-5)
            assert protos.shape[-1] <= a or bool((protos[j, :, a:] == 0).all())  # nothing from layer1


# ------------------------------------------------------------------------------------------- MSLR
def test_mslr_heldout_metric_counts_each_sample_once_under_padding(tmp_path):
    """With 2 ranks the held-out split (odd size) is padded by one duplicate; the summed metric must
    still be the probe metric on exactly the held-out samples. Both ranks' shards are fed in one
    process (a sum over ranks = a sum over their batches); oracle: 1/(1 + MAE) over the split by hand."""
    from mmbalance.methods.ogm_ge import probe_outputs

    from mmbalance.data import TensorBatcher

    tr = build_trainer("mslr", "synthetic-regression", run_dir=tmp_path / "r", epochs=1,
                       sets={"dataset.n_samples": 300, "train.max_steps_per_epoch": 1})
    ctx, meth = tr.ctx, tr.method
    held = ctx.heldout
    if len(held) % 2 == 0:
        held = held.subset(torch.arange(len(held) - 1))
        ctx.heldout = held
    n = len(held)
    assert n >= 9

    def two_ranks(split="train", batch_size=None, shuffle=False, key=0):
        assert split == "heldout"
        for r in range(2):
            yield from TensorBatcher(held, 4, shuffle=False, rank=r, world_size=2)
    ctx.train_batches = two_ranks
    got = meth.heldout_metrics(ctx)
    ctx.model.eval()
    ctx.modules["mslr_probes"].eval()
    with torch.no_grad():
        batch = held.batch(torch.arange(n))
        out = ctx.forward(batch)
        u = probe_outputs(ctx, ctx.modules["mslr_probes"], out, batch["label"], meth.kinds)
    for m in ctx.modalities:
        mae = float((u[m].reshape(-1).double() - batch["label"].reshape(-1).double()).abs().mean())
        assert abs(got[m] - 1 / (1 + mae)) < 1e-6, m
