"""Mutation testing for the balancing methods and the engine (run by hand, never in CI).

Each mutant is a realistic planted bug: (file, exact original snippet, mutated snippet, description,
bug class). The tool copies the working tree to a scratch directory (the working tree itself is never
touched), applies ONE mutant at a time to the copy, runs the tests of the mutated method, and records
whether they fail (killed) or pass (survived). It prints a per-method score table and writes JSON.

    python tools/mutation.py                       # every mutant, 1 worker
    python tools/mutation.py --method agm --method pmr --jobs 2 --json runs/mutation.json
    python tools/mutation.py --list                # the mutants, nothing run
    python tools/mutation.py --check               # every snippet still matches exactly once

Bug classes: ``rank-local`` (a cross-process reduction dropped), ``state-reset`` (state lost at an epoch
boundary or on resume), ``wrong-quantity`` (the coefficient driven by the wrong quantity), ``wrong-split``
(wrong split or wrong train/eval mode), ``off-by-one``, ``swapped`` (modalities swapped), ``sign`` (a
sign flip), ``detach`` (a missing or extra detach); and for the run/sweep machinery (``faults``):
``data-loss`` (a fault deletes or redoes a finished result), ``exit-code`` (a fault gets the wrong exit code
or message), ``validation`` (a bad input value is accepted or coerced); and for the every-method bug-class
tests (``classes``, tests/test_bug_classes.py): ``mode`` (a feature pass in train mode, or train mode not
restored after one), ``rng-source`` (randomness from the global RNG instead of the method's generator) and
``eval-drop`` (an evaluation that drops or repeats samples when the eval batch does not divide the split),
``predict-path`` (a method's own ``predict`` returning another combination than the one it documents),
``wrong-learner`` (a stage or sub-step updating another learner than the one its algorithm names),
``units`` (a segmentation statistic per image instead of per pixel, or over the wrong axis). A
mutant whose snippet no longer matches exactly once is reported as ``stale`` (the code moved on: update the
snippet), not silently skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("rank-local", "state-reset", "wrong-quantity", "wrong-split", "off-by-one", "swapped", "sign", "detach",
           "data-loss", "exit-code", "validation", "mode", "rng-source", "eval-drop",
           "predict-path", "wrong-learner", "units")

DDP_NODE = "tests/test_ddp.py::test_two_process_methods_keep_replicas_identical[{}]"

#: The tests run for each method's mutants (the method's own file). Mutants of class ``rank-local``
#: also run the method's 2-process DDP test (slow; it compares per-rank method state); ``wrong-split`` and
#: ``mode`` mutants also the every-method test of train/eval mode and test-split reads (BC_MODE).
TESTS: dict[str, list[str]] = {
    "cggm": ["tests/test_cggm.py"],
    "ogm_ge": ["tests/test_ogm_ge.py"],
    "agm": ["tests/test_agm.py"],
    "pmr": ["tests/test_pmr.py"],
    "gblending": ["tests/test_gblending.py"],
    "greedy": ["tests/test_greedy.py"],
    "umt": ["tests/test_ume_umt.py"],
    "ume": ["tests/test_ume_umt.py"],
    "qmf": ["tests/test_qmf.py"],
    "reconboost": ["tests/test_reconboost.py"],
    "mrd": ["tests/test_mrd.py"],
    "mslr": ["tests/test_mslr.py"],
    "engine": ["tests/test_engine.py", "tests/test_cli.py"],
    "arl": ["tests/test_arl.py"],
    "faults": ["tests/test_hardening.py"],
    "cml": ["tests/test_cml.py"],
    "classes": ["tests/test_bug_classes.py"],
    "mmpareto": ["tests/test_mmpareto.py"],
    "g2d": ["tests/test_g2d.py"],
    "mmcosine": ["tests/test_mmcosine.py"],
    "mbsd": ["tests/test_mbsd.py"],
    "masam": ["tests/test_masam.py"],  # its file holds its 2-process test (per-rank A, MA, last)
    "aug": ["tests/test_aug.py"],  # its file holds its 2-process test (per-rank K, pending, S)
    "opm": ["tests/test_opm.py"],
    "smv": ["tests/test_smv.py", "tests/test_engine_capabilities.py"],
    "lfm": ["tests/test_lfm.py"],
    "amco": ["tests/test_amco.py"],
    "midas": ["tests/test_midas.py"],
}
DDP_TESTS: dict[str, list[str]] = {m: [DDP_NODE.format(m)] for m in
                                   ("ogm_ge", "agm", "pmr", "gblending", "qmf", "mslr", "mrd", "greedy", "arl", "cml",
                                    "mmpareto", "g2d", "opm", "smv", "amco", "midas")}
DDP_TESTS["engine"] = ["tests/test_ddp.py::test_two_process_baseline"]


@dataclass
class Mutant:
    method: str
    file: str
    original: str
    mutated: str
    description: str
    bug_class: str
    tests: list[str] | None = None  # default: TESTS[method]
    id: str = field(default="")

    def test_targets(self) -> list[str]:
        targets = list(self.tests or TESTS[self.method])
        if self.bug_class == "rank-local":
            targets += DDP_TESTS.get(self.method, [])
        if self.bug_class in ("wrong-split", "mode") and BC_MODE not in targets:
            targets.append(BC_MODE)  # every method's feature passes (train/eval mode) and test-split reads
        return targets


def M(method: str, file: str, original: str, mutated: str, description: str, bug_class: str,
      tests: list[str] | None = None) -> Mutant:
    assert bug_class in CLASSES, bug_class
    return Mutant(method, file, original, mutated, description, bug_class, tests)


# ------------------------------------------------------------------------------------------ mutants
CG, OG, AG, PM, GB, GR = ("methods/cggm.py", "methods/ogm_ge.py", "methods/agm.py", "methods/pmr.py",
                          "methods/gblending.py", "methods/greedy.py")
UT, UE, QM, RB, MR, MS = ("methods/umt.py", "methods/ume.py", "methods/qmf.py", "methods/reconboost.py",
                          "methods/mrd.py", "methods/mslr.py")
EN = "mmbalance/engine.py"
AR, CM, GD = "methods/arl.py", "methods/cml.py", "methods/g2d.py"
MC, MB, MS_, SAM, AU = ("methods/mmcosine.py", "methods/mbsd.py", "methods/masam.py", "mmbalance/sam.py",
                        "methods/aug.py")
OP, SV, LF, AM = "methods/opm.py", "methods/smv.py", "methods/lfm.py", "methods/amco.py"
MI = "methods/midas.py"

H = "tests/test_hardening.py::"
BC_MODE = ("tests/test_bug_classes.py::"
           "test_feature_passes_run_in_eval_mode_and_nothing_reads_test_before_the_final_evaluation")
BC_RNG = "tests/test_bug_classes.py::test_methods_draw_randomness_from_their_generator_not_the_global_rngs"
BC_EVAL = ("tests/test_bug_classes.py::"
           "test_evaluation_scores_every_sample_once_when_the_eval_batch_does_not_divide_the_split")
BC_PRED = "tests/test_bug_classes.py::test_predict_is_the_documented_combination_by_hand"
BC_EPOCH = "tests/test_bug_classes.py::test_an_epoch_after_another_reports_what_it_reports_as_the_first"
BC_WINDOW = "tests/test_bug_classes.py::test_after_its_window_a_method_trains_as_if_the_window_never_opened"
BC_FLOW = "tests/test_bug_classes.py::test_each_loss_term_sends_gradient_exactly_where_the_method_says"
BC_SUBSTEP = "tests/test_bug_classes.py::test_each_substep_trains_only_its_modality_encoder"
BC_STAGE = "tests/test_bug_classes.py::test_each_stage_updates_exactly_the_learners_its_algorithm_names"
BC_PIXEL = "tests/test_bug_classes.py::test_segmentation_statistics_have_their_documented_unit_by_hand"
BC_AUX = "tests/test_bug_classes.py::test_auxiliary_losses_combine_the_modalities_as_documented"
BC_ORDER = "tests/test_bug_classes.py::test_per_modality_values_apply_in_modality_order"
BC_RUNNING = ["tests/test_bug_classes.py::test_per_modality_running_statistics_are_fed_their_own_modality",
              "tests/test_bug_classes.py::test_pmr_prototypes_are_each_modality_own_class_means"]
BC_GUARD = ["tests/test_bug_classes.py::test_cggm_guard_fires_on_the_magnitude_of_the_sum_not_its_sign",
            "tests/test_bug_classes.py::test_agm_exponent_cap_bounds_only_the_boost_side"]
MUTANTS: list[Mutant] = [
    # ---------------------------------------------------------------- CGGM
    M("cggm", CG, "parts = ctx.reduce_sum(self._parts)", "parts = self._parts.double()",
      "epsilon from this rank's batch only (numerator/denominator not SUM-reduced)", "rank-local"),
    M("cggm", CG, "        self._pending_snapshot = None\n\n    def metrics",
      "        self._pending_snapshot = None\n        self.eps_prev = None\n\n    def metrics",
      "epsilon memory reset at every epoch start (first step of each epoch sees Delta = epsilon)", "state-reset"),
    M("cggm", CG, '"eps_prev": None if self.eps_prev is None else self.eps_prev.cpu().clone()',
      '"eps_prev": None',
      'epsilon memory not checkpointed (lost on resume)', "state-reset"),
    M("cggm", CG, '        b = (s - delta) / s\n',
      '        b = delta / s\n',
      'B_m = Delta_m / sum Delta (the modality itself instead of the others, Eq. 7)', "wrong-quantity"),
    M("cggm", CG, "    delta = eps - prev\n", "    delta = prev - eps\n",
      "Delta epsilon with the sign flipped", "sign"),
    M("cggm", CG, 'parts = [self._score_parts(ctx, aux[m], y) for m in self.modalities]',
      'parts = [self._score_parts(ctx, out.logits.detach(), y) for m in self.modalities]',
      "epsilon scored on the fused head instead of the modality's classifier", "wrong-quantity"),
    M("cggm", CG, 'feats = {m: _detach(out.features[m]) for m in self.modalities}',
      'feats = {m: out.features[m] for m in self.modalities}',
      'classifier inputs not detached (classifier losses train the encoders)', "detach"),
    M("cggm", CG, "direction_on = ctx.epoch >= hp.start_epoch", "direction_on = ctx.epoch > hp.start_epoch",
      "direction term starts one epoch late", "off-by-one"),
    M("cggm", CG, "            loss = loss + hp.lam * self.lgm_prev\n",
      "            loss = loss + hp.lam * self.lgm_prev.detach()\n",
      "stale L_gm added detached (no gradient reaches W_F)", "detach"),
    M("cggm", CG, '            f = factors.to(device=grads[0].device, dtype=grads[0].dtype)\n',
      '            f = factors.flip(0).to(device=grads[0].device, dtype=grads[0].dtype)\n',
      'gradient factors applied to the wrong (reversed) modalities', "swapped"),
    # ---------------------------------------------------------------- OGM-GE
    M("ogm_ge", OG, "s = ctx.reduce_sum(score_sums(ctx.task.name, u, y, self.tau))",
      "s = score_sums(ctx.task.name, u, y, self.tau).double()",
      "scores from this rank's batch only (no SUM over ranks)", "rank-local"),
    M("ogm_ge", OG, "out.append(um.softmax(-1).gather(1, y.long()[:, None]).sum())",
      "out.append(um.softmax(-1).max(-1).values.sum())",
      "max-class probability instead of the true-class probability", "wrong-quantity"),
    M("ogm_ge", OG, "out.append(um.softmax(-1).gather(1, y.long()[:, None]).sum())",
      "out.append(um.softmax(0).gather(1, y.long()[:, None]).sum())",
      "softmax over the batch axis", "wrong-quantity"),
    M("ogm_ge", OG, "        den = (s.sum() - s) / (M - 1)\n", "        den = s.sum() / M\n",
      "the modality itself counted in its own ratio's denominator", "wrong-quantity"),
    M("ogm_ge", OG, "torch.where(rho > 1, 1 - torch.tanh(alpha * arg), torch.ones_like(rho))",
      "torch.where(rho < 1, 1 - torch.tanh(alpha * arg), torch.ones_like(rho))",
      "the weaker modality is suppressed (condition flipped)", "sign"),
    M("ogm_ge", OG, "return self.hp.start_epoch <= epoch <= self.hp.end_epoch",
      "return self.hp.start_epoch <= epoch < self.hp.end_epoch",
      "modulation window excludes its last epoch", "off-by-one"),
    M("ogm_ge", OG, 'self.k = {m: (float(k[i]) if self.hp.apply_to == "lr" else ks[i]) for i, m in enumerate(self.modalities)}',
      'self.k = {m: (float(k[-1 - i]) if self.hp.apply_to == "lr" else ks[-1 - i]) for i, m in enumerate(self.modalities)}',
      'coefficients assigned to the wrong modalities', "swapped"),
    M("ogm_ge", OG, '        if noise_std_source == "post":\n            scale = _noise_scales(grads)\n',
      "        scale = _noise_scales(grads)\n",
      "GE noise std taken after scaling instead of before (official: before)", "wrong-quantity"),
    M("ogm_ge", OG, 'return {m: (out.features[m] if kinds[m] == "map" else out.pooled[m]).detach().float() for m in kinds}',
      'return {m: (out.features[m] if kinds[m] == "map" else out.pooled[m]).float() for m in kinds}',
      "probe inputs not detached (probe losses train the encoders)", "detach",
      ["tests/test_ogm_ge.py", "tests/test_mslr.py"]),
    # ---------------------------------------------------------------- AGM
    M("agm", AG, "tot = ctx.reduce_sum(torch.cat([num.double()", "tot = (torch.cat([num.double()",
      "scores from this rank's batch only (no SUM over ranks)", "rank-local"),
    M("agm", AG, "    def after_backward(self, ctx: StepContext) -> None:\n        \"\"\"Conditional clip",
      "    def on_epoch_start(self, ctx: StepContext) -> None:\n        self.t = 0\n"
      "        self.s_bar = torch.zeros_like(self.s_bar)\n\n"
      "    def after_backward(self, ctx: StepContext) -> None:\n        \"\"\"Conditional clip",
      "running mean S-bar reset at every epoch start", "state-reset"),
    M("agm", AG, '"s_bar": self.s_bar.cpu(), "kappa"',
      '"s_bar": torch.zeros_like(self.s_bar).cpu(), "kappa"',
      'running mean S-bar not checkpointed (lost on resume)', "state-reset"),
    M("agm", AG, 'picked = logp.gather(2, idx).clamp_min(LOG_FLOOR)',
      'picked = logp.max(2, keepdim=True).values.clamp_min(LOG_FLOOR)',
      'max-class log-probability instead of the true class', "wrong-quantity"),
    M("agm", AG, "    diff = r_bar - r\n", "    diff = r - r_bar\n", "kappa exponent with the sign flipped", "sign"),
    M("agm", AG, 'self.s_bar = s_bar * (self.t - 1) / self.t + s / self.t',
      'self.s_bar = s_bar * self.t / (self.t + 1) + s / (self.t + 1)',
      'cumulative mean divides by one more step than it has seen', "off-by-one"),
    M("agm", AG, 'if self.hp.coalition_mode == "eval":\n            model.eval()',
      'if self.hp.coalition_mode == "train":\n            model.eval()',
      "coalition passes run in train mode (dropout on)", "wrong-split"),
    M("agm", AG, "out = ScaledSum.apply(mono, self.kappa)", "out = ScaledSum.apply(mono, self.kappa.flip(0))",
      "kappa of another modality scales each response", "swapped"),
    M("agm", AG, "return self.hp.start_epoch <= ctx.epoch <= end", "return self.hp.start_epoch <= ctx.epoch < end",
      "modulation window excludes its last epoch", "off-by-one"),
    M("agm", AG, "            w = math.factorial(r) * math.factorial(M - r - 1) / math.factorial(M)\n",
      "            w = 1.0 / M\n", "Shapley weights replaced by uniform 1/M", "wrong-quantity"),
    # ---------------------------------------------------------------- PMR
    M("pmr", PM, "s = ctx.reduce_sum(torch.stack(scores))", "s = torch.stack(scores).double()",
      "scores from this rank's batch only (no SUM over ranks)", "rank-local"),
    M("pmr", PM, "sums, counts = ctx.reduce_sum(sums), ctx.reduce_sum(counts)", "sums, counts = sums, counts",
      "prototypes from this rank's subset only", "rank-local"),
    M("pmr", PM, "torch.where(rho < 1, torch.full_like(rho, alpha), torch.zeros_like(rho))",
      "torch.where(rho > 1, torch.full_like(rho, alpha), torch.zeros_like(rho))",
      "PCE applied to the leading modality instead of the lagging one", "sign"),
    M("pmr", PM, "    others = (s.sum() - s) / max(1, n - 1)\n", "    others = s.sum() / n\n",
      "the modality itself counted in its own ratio's denominator", "wrong-quantity"),
    M("pmr", PM, "true_p = p.gather(1, y[:, None])[:, 0].detach()", "true_p = p.max(1).values.detach()",
      "max-class probability instead of the true-class probability", "wrong-quantity"),
    M("pmr", PM, "            p = logits.softmax(-1)\n", "            p = logits.softmax(0)\n",
      "prototype softmax over the batch axis", "wrong-quantity"),
    M("pmr", PM, "key=1_000_000 + ctx.phase_index * 10_007 + ctx.epoch)", "key=1_000_000 + ctx.phase_index * 10_007)",
      "prototype subset not reshuffled per epoch (same batches every epoch)", "wrong-split"),
    M("pmr", PM, "        model.eval()\n        first = self.prototypes is None",
      "        model.train()\n        first = self.prototypes is None",
      "prototypes computed in train mode (dropout on)", "wrong-split"),
    M("pmr", PM, "return -diff.pow(2).sum(-1).clamp_min(1e-12).sqrt()", "return -diff.pow(2).sum(-1).clamp_min(1e-12)",
      "squared distance instead of the Euclidean distance", "wrong-quantity"),
    M("pmr", PM, "return self.hp.start_epoch <= ctx.epoch <= end", "return self.hp.start_epoch <= ctx.epoch < end",
      "PCE window excludes its last epoch", "off-by-one"),
    M("pmr", PM, "protos = (1 - self.hp.momentum) * new + self.hp.momentum * old",
      "protos = self.hp.momentum * new + (1 - self.hp.momentum) * old",
      "prototype momentum applied the wrong way round", "swapped"),
    # ---------------------------------------------------------------- G-Blending
    M("gblending", GB, 'enumerate(ctx.train_batches(split="train", shuffle=True, key=key))',
      'enumerate(ctx.train_batches(split="heldout", shuffle=True, key=key))',
      "sub-networks trained on the held-out split V", "wrong-split"),
    M("gblending", GB, "g_list.append(lv0 - lv1)", "g_list.append(lv1 - lv0)", "generalisation gain with the sign flipped", "sign"),
    M("gblending", GB, "o_list.append((lv1 - lt1) - (lv0 - lt0))", "o_list.append(lv1 - lt1)",
      "overfitting measured as O_{N+n} instead of Delta O", "wrong-quantity"),
    M("gblending", GB, "    denom = o.pow(2) + 1e-8\n", "    denom = o.abs() + 1e-8\n",
      "weights G/|O| instead of G/O^2", "wrong-quantity"),
    M("gblending", GB, 'total = w[k] * lm if total is None else total + w[k] * lm',
      'total = w[len(mods) - 1 - k] * lm if total is None else total + w[len(mods) - 1 - k] * lm',
      'unimodal weights applied to the wrong heads', "swapped"),
    M("gblending", GB, "key = 50_000_000 + tag * 10_007 + e", "key = 50_000_000 + tag * 10_007",
      "sub-network training not reshuffled per epoch", "wrong-split"),
    M("gblending", GB, "        net.eval()\n        for batch in ctx.train_batches(split=split",
      "        net.train()\n        for batch in ctx.train_batches(split=split",
      "sub-networks measured in train mode (dropout on)", "wrong-split"),
    M("gblending", GB, "total, count = ctx.reduce_sum(total), ctx.reduce_sum(count)", "total, count = total, count",
      "held-out losses from this rank's shard only", "rank-local"),
    M("gblending", GB, "    out, e = [0], first\n", "    out, e = [0], first + 1\n",
      "first re-estimate one epoch late", "off-by-one"),
    M("gblending", GB, "        torch.set_rng_state(rng)\n", "        pass\n",
      "estimate consumes the main RNG stream (not restored)", "state-reset"),
    # ---------------------------------------------------------------- Greedy
    M("greedy", GR, "            total = ctx.reduce_sum(flat).to(block.gate_avg(0).device)",
      "            total = flat.to(block.gate_avg(0).device)",
      "gate running averages from this rank's batch only", "rank-local"),
    M("greedy", GR, "math.log10(b / a) if a > 0 and b > 0", "math.log10(a / b) if a > 0 and b > 0",
      "conditional learning speed with the sign flipped", "sign"),
    M("greedy", GR, "return max(range(len(s)), key=lambda k: (s[k], -k))", "return min(range(len(s)), key=lambda k: (s[k], -k))",
      "the slowest branch is chosen as caring branch", "swapped"),
    M("greedy", GR, "st.caring, st.remaining = c, self.hp.window", "st.caring, st.remaining = c, self.hp.window + 1",
      "re-balancing window one step too long", "off-by-one"),
    M("greedy", GR, 'if self.hp.mode != "guided" or epoch < self.hp.start_epoch:',
      'if self.hp.mode != "guided" or epoch <= self.hp.start_epoch:',
      "re-balancing starts one epoch late", "off-by-one"),
    M("greedy", GR, "        ctx.raw_model.set_rebalance(None)\n        return ctx.forward(batch, absent).logits",
      "        return ctx.forward(batch, absent).logits",
      "evaluation keeps the training re-balancing mode", "wrong-split"),
    M("greedy", GR, "        out[name] = num / den if den > 0 else 0.0", "        out[name] = num if den > 0 else 0.0",
      "speed ratio without the parameter-norm denominator", "wrong-quantity"),
    M("greedy", GR, 'return {"greedy": dict(self.state.__dict__, acc=dict(self.state.acc))}',
      'return {"greedy": dict(self.state.__dict__, acc={})}',
      "accumulated speeds not checkpointed (lost on resume)", "state-reset"),
    M("greedy", GR, "losses = [ctx.task.loss(out.fused[:, k], y) for k in range(len(self._mods))]",
      "losses = [ctx.task.loss(out.logits, y) for k in range(len(self._mods))]",
      "loss on the averaged prediction instead of each branch", "wrong-quantity"),
    M("greedy", GR, "        if self._rebalanced_this_step:  # no accumulation during re-balancing steps\n"
      "            st.rebalance_steps += 1\n",
      "        if self._rebalanced_this_step:  # no accumulation during re-balancing steps\n"
      "            st.rebalance_steps += 1\n            self.observe({n: group_ratio(p) for n, p in self._groups.items()}, ctx.epoch)\n",
      "speeds accumulated during re-balancing steps too", "wrong-split"),
    # ---------------------------------------------------------------- UMT
    M("umt", UT, "t_feats = teacher.encode({m: batch[m]})[m]", "t_feats = teacher.train().encode({m: batch[m]})[m]",
      "teachers run in train mode (dropout on)", "wrong-split"),
    M("umt", UT, "loss = task_loss + self.hp.lam * distill", "loss = task_loss + distill", "lambda ignored", "wrong-quantity"),
    M("umt", UT, "loss = task_loss + self.hp.lam * distill", "loss = task_loss - self.hp.lam * distill",
      "distillation term with the sign flipped", "sign"),
    M("umt", UT, 'if self.hp.student_init == "teacher":', 'if self.hp.student_init == "scratch":',
      "student initialised from the teachers by default", "wrong-split"),
    M("umt", UT, "mse = F.mse_loss(z.float(), t.detach().float())", "mse = F.mse_loss(z.float(), t.detach().float(), reduction=\"sum\")",
      "MSE summed instead of averaged", "wrong-quantity"),
    M("umt", UT, "mse = F.mse_loss(z.float(), t.detach().float())", "mse = F.mse_loss(z.detach().float(), t.detach().float())",
      "student features detached (distillation sends no gradient)", "detach"),
    M("umt", UT, "            teacher = ctx.modules[f\"umt_teacher_{m}\"]\n",
      "            teacher = ctx.modules[f\"umt_teacher_{m}\"].train()\n",
      "teacher left in train mode after the first step", "wrong-split"),
    # ---------------------------------------------------------------- UME
    M("ume", UE, "w = weights or {m: 1.0 / len(members) for m in members}", "w = weights or {m: 1.0 for m in members}",
      "weights sum to M instead of 1", "wrong-quantity"),
    M("ume", UE, "            model.members[m].load_state_dict(teacher.state_dict())\n", "            pass\n",
      "members never loaded from the trained unimodal models", "state-reset"),
    M("ume", UE, "torch.zeros_like(inputs[m]) if m in absent else inputs[m]", "torch.zeros_like(inputs[m]) if m not in absent else inputs[m]",
      "absent modalities swapped with present ones", "swapped"),
    M("ume", UE, "probs = sum(w[k] * o.float().softmax(dim=1) for k, o in enumerate(outputs))",
      "probs = sum(w[k] * o.float().softmax(dim=0) for k, o in enumerate(outputs))",
      "probability average with softmax over the batch axis", "wrong-quantity"),
    M("ume", UE, "return probs.clamp_min(1e-12).log()", "return probs.clamp_min(1e-12)",
      "averaged probabilities returned without the log (wrong validation loss)", "wrong-quantity"),
    M("ume", UE, 'return [{"params": list(model.parameters()), "name": "ensemble", "lr_mult": 0.0}]',
      'return [{"params": list(model.parameters()), "name": "ensemble", "lr_mult": 1.0}]',
      "ensemble parameters not frozen", "wrong-split"),
    M("ume", UE, "        return sum(w[k] * o for k, o in enumerate(outputs))\n",
      "        return sum(w[len(outputs) - 1 - k] * o for k, o in enumerate(outputs))\n",
      "member weights applied in reversed modality order", "swapped"),
    # ---------------------------------------------------------------- QMF
    M("qmf", QM, "        if ctx.world_size > 1:\n            idx, losses = ctx.accelerator.gather(",
      "        if False:\n            idx, losses = ctx.accelerator.gather(",
      "loss history updated from this rank's samples only", "rank-local"),
    M("qmf", QM, "    t = torch.sign(h - h_j)\n", "    t = torch.sign(h_j - h)\n", "ranking target with the sign flipped", "sign"),
    M("qmf", QM, "        lo, hi = self.history.aminmax(dim=1, keepdim=True)\n",
      "        lo, hi = self.history[:, idx.long()].aminmax(dim=1, keepdim=True)\n",
      "history normalised over the batch instead of the whole array", "wrong-quantity"),
    M("qmf", QM, "        w = weights[m].detach() if detach else weights[m]\n", "        w = weights[m]\n",
      "confidence weights not detached in the fused logits", "detach"),
    M("qmf", QM, "return torch.logsumexp(logits.float(), dim=dim) / scale",
      "return logits.float().max(dim=dim).values / scale",
      "max logit instead of the energy (log-sum-exp)", "wrong-quantity"),
    M("qmf", QM, "    w_j, h_j = w.roll(-1), h.roll(-1)\n", "    w_j, h_j = w.roll(-1), h.roll(1)\n",
      "ranking pairs misaligned by one", "off-by-one"),
    M("qmf", QM, 'return {"history": None if self.history is None else self.history.cpu().clone()}', 'return {"history": None}',
      "loss history not checkpointed (lost on resume)", "state-reset"),
    M("qmf", QM, "    @torch.no_grad()\n    def predict(", "    def on_epoch_start(self, ctx: StepContext) -> None:\n"
      "        self.history.zero_()\n\n    @torch.no_grad()\n    def predict(",
      "loss history reset at every epoch start", "state-reset"),
    M("qmf", QM, '        if self.hp.history_update == "before":\n', '        if self.hp.history_update == "never":\n',
      "history updated after the rank loss by default (off by one step)", "off-by-one"),
    M("qmf", QM, "            cols.append(F.cross_entropy(o.float(), y.long(), reduction=\"none\"))\n",
      "            cols.append(1 - o.float().softmax(-1).gather(1, y.long()[:, None])[:, 0])\n",
      "history records 1 - p(true class) instead of the cross-entropy", "wrong-quantity"),
    # ---------------------------------------------------------------- ReconBoost
    M("reconboost", RB, "        if fresh:\n            opt = getattr(ctx.optimizer, \"optimizer\", ctx.optimizer)\n",
      "        ctx.raw_model.beta.data.fill_(1.0)\n        if fresh:\n            opt = getattr(ctx.optimizer, \"optimizer\", ctx.optimizer)\n",
      "beta reset at every phase start", "state-reset"),
    M("reconboost", RB, "    return w1 - w2 * s\n", "    return w1 - w2 * (1 - s)\n",
      "sample weights rise with agreement instead of falling", "sign"),
    M("reconboost", RB, "others = out.fused.detach().sum(dim=1) - out.fused[:, k].detach()",
      "others = out.fused.detach().sum(dim=1)",
      "agreement of F including the boosted learner itself", "wrong-quantity"),
    M("reconboost", RB, "return logits.softmax(dim=1).gather(1, y.long().unsqueeze(1)).squeeze(1)",
      "return logits.softmax(dim=1).max(1).values",
      "max-class probability instead of the true class", "wrong-quantity"),
    M("reconboost", RB, "return logits.softmax(dim=1).gather(1, y.long().unsqueeze(1)).squeeze(1)",
      "return logits.softmax(dim=0).gather(1, y.long().unsqueeze(1)).squeeze(1)",
      "agreement softmax over the batch axis", "wrong-quantity"),
    M("reconboost", RB, "        logits = (beta * others).float()\n", "        logits = others.float()\n",
      "agreement of F_{-m} without beta", "wrong-quantity"),
    M("reconboost", RB, '            g["lr_mult"] = factor if active else 0.0\n', '            g["lr_mult"] = factor\n',
      "inactive encoders keep learning in phase 1", "wrong-split"),
    M("reconboost", RB, "            loss_b = loss_b / ctx.raw_model.out_dim\n", "            loss_b = loss_b\n",
      "boosting loss without the official 1/C factor", "wrong-quantity"),
    M("reconboost", RB, "            m = order[t % len(order)]\n", "            m = order[(t + 1) % len(order)]\n",
      "stage modality order shifted by one", "off-by-one"),
    M("reconboost", RB, "            opt.state.clear()\n", "            pass\n",
      "optimizer momentum carried across phases", "state-reset"),
    M("reconboost", RB, "torch.is_grad_enabled() and (active is None or m == active)",
      "torch.is_grad_enabled() and (active is None or m != active)",
      "gradient to the other learners instead of the boosted one", "swapped"),
    # ---------------------------------------------------------------- MRD
    M("mrd", MR, "return full[rank * batch_size:(rank + 1) * batch_size]", "return full[:batch_size]",
      "every rank uses the same rows of the global mask", "rank-local"),
    M("mrd", MR, "drop = torch.rand(batch_size, generator=generator) < hp.p_drop",
      "drop = torch.rand(batch_size, generator=generator) > hp.p_drop",
      "drop probability 1 - p instead of p", "sign"),
    M("mrd", MR, "which = torch.randint(n_modalities, (batch_size,), generator=generator)",
      "which = torch.randint(max(1, n_modalities - 1), (batch_size,), generator=generator)",
      "the last modality is never dropped", "off-by-one"),
    M("mrd", MR, "scale = keep * (len(mods) / n_kept)", "scale = keep * (n_kept / len(mods))",
      "rescale factor inverted", "wrong-quantity"),
    M("mrd", MR, "self._scale = {m: scale[:, k] for k, m in enumerate(mods)}",
      "self._scale = {m: scale[:, len(mods) - 1 - k] for k, m in enumerate(mods)}",
      "mask columns applied to the wrong modalities", "swapped"),
    M("mrd", MR, "batch[m] = torch.where(s > 0, x * s, neutral)", "batch[m] = torch.where(s > 0, neutral, x * s)",
      "input level: kept inputs replaced, dropped ones kept", "swapped"),
    M("mrd", MR, "    for _ in range(1000):  # re-draw", "    for _ in range(0):  # re-draw",
      "all-dropped samples not re-drawn (always keep the first modality)", "wrong-quantity"),
    M("mrd", MR, "            if self._scale is None or not module.training:\n", "            if self._scale is None:\n",
      "masks also applied to forwards outside training", "wrong-split"),
    M("mrd", MR, "                    out_z = out_z + (1 - keep) * token.to(z.dtype)\n",
      "                    out_z = out_z + keep * token.to(z.dtype)\n",
      "learned token added to kept samples instead of dropped ones", "swapped"),
    # ---------------------------------------------------------------- MSLR
    M("mslr", MS, 'for batch in ctx.train_batches(split="heldout", shuffle=False):',
      'for batch in ctx.train_batches(split="train", shuffle=False):',
      "unimodal metric measured on the training batches instead of the held-out split", "wrong-split"),
    M("mslr", MS, "        total, count = ctx.reduce_sum(total), ctx.reduce_sum(count)\n",
      "        total, count = total, count\n",
      "held-out metric sums from this rank's shard only", "rank-local"),
    M("mslr", MS, "        if len(self.memory) < self.K:\n", "        if len(self.memory) <= self.K:\n",
      "window of K + 1 epochs", "off-by-one"),
    M("mslr", MS, "ratio = a / mean if mean > 0 else 1.0", "ratio = mean / a if a > 0 else 1.0",
      "ratio inverted", "sign"),
    M("mslr", MS, "        self.memory.popleft()\n", "        pass\n", "memory never drops its oldest value", "off-by-one"),
    M("mslr", MS, "        mean = sum(self.memory) / len(self.memory)\n",
      "        mean = (sum(self.memory) + a) / (len(self.memory) + 1)\n",
      "the current metric included in its own reference mean", "wrong-quantity"),
    M("mslr", MS, "        model.eval()\n        probes.eval()\n", "        model.train()\n        probes.eval()\n",
      "held-out metric measured with the model in train mode", "wrong-split"),
    M("mslr", MS, "return {m: metric_value(ctx.task.name, float(mean[j]), k) for j, m in enumerate(mods)}",
      "return {m: metric_value(ctx.task.name, float(mean[len(mods) - 1 - j]), k) for j, m in enumerate(mods)}",
      "held-out metrics assigned to the wrong modalities", "swapped"),
    M("mslr", MS, '"mem": {m: s.state() for m, s in self.mem.items()}',
      '"mem": {m: MemoryRatio(self.hp.window, self.hp.accumulate).state() for m in self.mem}',
      "metric memory not checkpointed (lost on resume)", "state-reset"),
    # ---------------------------------------------------------------- engine
    M("engine", "mmbalance/data/batching.py", "    for start in range(0, total, chunk):\n",
      "    for start in range(0, total - chunk + 1, chunk):\n", "evaluation drops the last partial batch", "off-by-one"),
    M("engine", EN, "loader.set_epoch(pos.phase_index * 100_003 + pos.epoch)", "loader.set_epoch(pos.phase_index * 100_003)",
      "no reshuffle per epoch", "wrong-split"),
    M("engine", EN, "                        val, val_pm = self.evaluate(self.data.val), None\n",
      "                        val, val_pm = self.evaluate(self.data.test), None\n",
      "checkpoint selected on the test split", "wrong-split", ["tests/test_engine.py", "tests/test_cli.py", BC_MODE]),
    M("engine", EN, "            return cmp > 0\n", "            return cmp < 0\n", "selection keeps the worse epoch", "sign"),
    M("engine", EN, "self.train_split, ctx.heldout = self._carve_heldout(self.data.train)",
      "ctx.heldout = self._carve_heldout(self.data.train)[1]",
      "held-out part not removed from the training split", "wrong-split"),
    M("engine", EN, "                if after_backward is not None:\n                    after_backward(ctx)\n",
      "                if cfg.grad_clip:\n                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)\n"
      "                if after_backward is not None:\n                    after_backward(ctx)\n",
      "gradients clipped before the method's gradient edits", "wrong-split"),
    M("engine", EN, '        ctx.generator.set_state(rng["method"])\n', "        pass\n",
      "method generator not restored on resume", "state-reset"),
    M("engine", EN, "                for opt in extra_opts:\n                    opt.zero_grad(set_to_none=to_none)\n", "",
      "method-owned modules' gradients never cleared (accumulate across steps)", "state-reset"),
    M("engine", EN, "            it.set_epoch(key)\n", "            it.set_epoch(0)\n",
      "extra train passes ignore the shuffle key", "wrong-split"),
    M("engine", EN, "            ctx.model.eval()\n            for ex in ctx.extra.values():\n                ex.module.eval()\n",
      "            for ex in ctx.extra.values():\n                ex.module.eval()\n",
      "evaluation with the model in train mode", "wrong-split", ["tests/test_engine.py", "tests/test_cli.py", BC_MODE]),
    M("engine", EN, 'g["lr"] = g["base_lr"] * factor * g.get("lr_mult", 1.0)', 'g["lr"] = g["base_lr"] * factor',
      "per-group lr multipliers ignored", "wrong-quantity"),
    # ---------------------------------------------------------------- ARL
    M("arl", AR, "stats = arl_weights(ctx.reduce_sum(self._sums), self.hp.T, self.floor)",
      "stats = arl_weights(self._sums.double(), self.hp.T, self.floor)",
      "weights from this rank's batch only (sums not SUM-reduced)", "rank-local"),
    M("arl", AR, "factors.append(parts[k])", "factors.append(parts[len(self.mods) - 1 - k])",
      "multipliers applied to the other modality's encoder", "swapped"),
    M("arl", AR, "w = torch.softmax(T * (1.0 - c) * q, dim=0)", "w = torch.softmax(-T * (1.0 - c) * q, dim=0)",
      "softmax logits with the sign flipped", "sign"),
    M("arl", AR, "w = torch.softmax(T * (1.0 - c) * q, dim=0)", "w = torch.softmax(T * c * q, dim=0)",
      "own logit magnitude instead of the others' (c_m for 1 - c_m)", "wrong-quantity"),
    M("arl", AR, "h = (ent / ent.sum().clamp_min(1e-30)).clamp_min(floor)", "h = ent / ent.sum().clamp_min(1e-30)",
      "entropy floor not applied", "wrong-quantity"),
    M("arl", AR, "return ctx.epoch > self.hp.start", "return ctx.epoch >= self.hp.start",
      "scaling and gamma start one epoch early", "off-by-one"),
    M("arl", AR, 'auto_shared="shared_zero_pad",\n                                   detach_shared=False)',
      'auto_shared="shared_zero_pad",\n                                   detach_shared=True)',
      "unimodal losses do not train the shared head (head weights detached)", "detach"),
    M("arl", AR, "return (1.0 + stats[\"w\"]).float()", "return stats[\"w\"].float()",
      "gradients multiplied by w instead of 1 + w", "wrong-quantity"),
    # ---------------------------------------------------------------- faults (run folders, sweeps, exit codes)
    M("faults", "mmbalance/runfolder.py", "        (tmp / n).rename(run_dir / n)\n",
      "        shutil.rmtree(tmp / n) if (tmp / n).is_dir() else (tmp / n).unlink()\n",
      "a killed --overwrite's set-aside files are deleted as a leftover instead of restored", "data-loss",
      [H + "test_killed_overwrite_set_aside_is_restored_never_deleted"]),
    M("faults", "mmbalance/run.py", "                runfolder.recover_set_aside(run_dir)\n", "",
      "an interrupted set-aside is not restored before the folder is inspected", "data-loss",
      [H + "test_killed_overwrite_set_aside_is_restored_never_deleted"]),
    M("faults", "mmbalance/runfolder.py", "        if recorded_world_size(state.result) == world_size:\n            return",
      "        if recorded_world_size(state.result) == world_size and state.same_config is None:\n            return",
      "a sweep's from-scratch retry recomputes a finished result of the same settings", "data-loss",
      [H + "test_a_finished_result_of_the_plan_is_done_never_rerun_with_overwrite"]),
    M("faults", "mmbalance/leaderboard/plan.py", '        return RunState(spec, "failed" if status is None or',
      '        return RunState(spec, "missing" if status is None or',
      "an unreadable result.json counts as not run (the report hides it)", "data-loss",
      [H + "test_build_names_a_corrupt_result_and_refuses_a_results_dir_without_runs"]),
    M("faults", "mmbalance/leaderboard/cli.py", 'if all(st.state == "missing" for st in states):', "if False:",
      "build over a results folder without runs replaces the report", "data-loss",
      [H + "test_build_names_a_corrupt_result_and_refuses_a_results_dir_without_runs"]),
    M("faults", "mmbalance/preempt.py", "if time.monotonic() - _first_at < ECHO_SECONDS:", "if False:",
      "a launcher's forwarded copy of SIGTERM counts as a second signal", "exit-code",
      [H + "test_second_sigterm_stops_at_once_with_143_checkpoint_kept_no_traceback"]),
    M("faults", "mmbalance/run.py", "                    late = preempt.requested()\n", "",
      "a signal after the last epoch is ignored (exit 0)", "exit-code",
      [H + "test_a_signal_after_the_last_epoch_keeps_the_result_and_exits_128_plus_n"]),
    M("faults", "mmbalance/launch.py", "code not in DELIBERATE_CODES, rank)", "0, rank)",
      "launch returns the lowest failing rank's code (a terminated rank's)", "exit-code",
      [H + "test_launch_returns_the_failing_ranks_code_not_a_terminated_ranks"]),
    M("faults", "mmbalance/runfiles.py", "                raise rec.error from exc\n", "                raise\n",
      "a full disk during torch.save reports torch's 'unexpected pos'", "exit-code",
      [H + "test_full_disk_during_a_checkpoint_says_no_space_left"]),
    M("faults", "mmbalance/run.py", "        if exc.errno not in _WRITE_ERRNOS:\n", "        if True:\n",
      "a lock file that cannot be created is a traceback (exit 1)", "exit-code",
      [H + "test_lock_file_that_cannot_be_created_is_exit_4"]),
    M("faults", "mmbalance/run.py", "                        if is_main:\n                            _record_setup_crash(",
      "                        if False:\n                            _record_setup_crash(",
      "a crash in setup() leaves no failed result.json", "exit-code",
      [H + "test_a_crash_in_setup_leaves_a_failed_result"]),
    M("faults", "mmbalance/config.py", '("momentum", "weight_decay", "gamma"', '("momentum", "gamma"',
      "weight_decay: .inf accepted", "validation",
      [H + "test_non_finite_or_negative_training_values_are_exit_2_naming_the_key"]),
    M("faults", "mmbalance/run.py", "if isinstance(value, bool) or not isinstance(value, int) or value < 0:",
      "if isinstance(value, float):\n        value = int(value)\n    if isinstance(value, bool) or not isinstance(value, int) or value < 0:",
      "seed: 1.7 in a config file silently becomes seed 1", "validation",
      [H + "test_bad_seed_in_a_config_file_is_exit_2_naming_the_key"]),
    M("faults", "mmbalance/leaderboard/plan.py", "            DATASETS.get(entry.name)  # unknown name", "            pass  # unknown name",
      "a suite's unknown dataset is found only after a run", "validation",
      [H + "test_a_suite_with_an_unknown_dataset_is_refused_before_any_run"]),
    M("faults", "mmbalance/registry.py", "    data.check_modalities()\n", "",
      "a plug-in dataset whose modality names do not match its inputs ends in a traceback", "validation",
      [H + "test_plugin_dataset_mistakes_are_clear_exit_2"]),
    M("faults", "mmbalance/leaderboard/tune.py", 'return v if result.get("higher_is_better", True) else -v', "return v",
      "tuning chooses a lower-is-better metric by its highest value", "sign",
      [H + "test_tuning_choice_follows_the_metric_direction"]),
    M("faults", "mmbalance/runfolder.py", "        if recorded_world_size(state.result) == world_size:\n            return",
      "        if True:\n            return", "--skip-finished keeps a finished 1-process result for a 2-process request (config hash only)",
      "validation", ["tests/test_reliability.py::test_skip_finished_keeps_only_a_result_of_the_same_settings_and_process_count"]),
    M("faults", "mmbalance/run.py", 'skip_finished=getattr(args, "skip_finished", False), world_size=world)',
      'skip_finished=getattr(args, "skip_finished", False))',
      "--skip-finished decided for one process whatever the launcher started", "validation",
      ["tests/test_reliability.py::test_skip_finished_keeps_only_a_result_of_the_same_settings_and_process_count"]),
    M("faults", "mmbalance/run.py", 'getattr(args, "skip_finished", False) and runfolder.keeps_finished(state, world))',
      'getattr(args, "skip_finished", False) and state.kind == "finished" and state.same_config and state.result '
      'is not None)', "--skip-finished: a non-main rank ignores the process count (it leaves while rank 0 trains)",
      "rank-local", ["tests/test_reliability.py::test_skip_finished_keeps_only_a_result_of_the_same_settings_and_process_count"]),
    # ---------------------------------------------------------------- CML
    M("cml", CM, "            reg_term = reg * ctx.world_size\n", "            reg_term = reg\n",
      "per-rank sum not scaled by the world size (DDP's average halves the regulariser)", "rank-local"),
    M("cml", CM, "reg, viol, pairs = ctx.reduce_sum(torch.cat([self._epoch_sums, pairs])).tolist()",
      "reg, viol, pairs = torch.cat([self._epoch_sums, pairs]).tolist()",
      "epoch regulariser statistics of this rank only", "rank-local"),
    M("cml", CM, "conf = torch.stack([c.values for c in confs])",
      "conf = torch.stack([p.gather(1, y.unsqueeze(1)).squeeze(1) for p in probs])",
      "true-class probability instead of the predicted-class confidence", "wrong-quantity"),
    M("cml", CM, "hinge = torch.relu((reduced - fuller) * g - margin)", "hinge = torch.relu((fuller - reduced) * g - margin)",
      "penalises confidence drops instead of rises", "sign"),
    M("cml", CM, "torch.relu((reduced - fuller.detach()) * both_wrong - margin)",
      "torch.relu((reduced - fuller) * both_wrong - margin)", "miwae both-wrong term without the detach", "detach"),
    M("cml", CM, "g = (~(c_red & ~c_full)).to(conf.dtype)", "g = (~(c_full & ~c_red)).to(conf.dtype)",
      "CPM gate with the levels swapped", "swapped"),
    M("cml", CM, "gone = (ranks[:, j] < k).view(", "gone = (ranks[:, j] <= k).view(",
      "one modality too many removed at every level", "off-by-one"),
    M("cml", CM, "        self._epoch_sums = None\n        self._pairs = 0\n", "        pass\n",
      "epoch statistics not reset at the epoch start (they accumulate across epochs)", "state-reset"),
    # ---------------------------------------------------------------- bug classes checked for every method
    M("classes", PM, "        finally:\n            model.train(was_training)\n        sums, counts",
      "        finally:\n            pass\n        sums, counts",
      "PMR: train mode not restored after the prototype pass (the epoch trains in eval mode)", "mode", [BC_MODE]),
    M("classes", "methods/relearning.py", "        model.eval()\n        try:\n            f_tr, y_tr",
      "        try:\n            f_tr, y_tr", "re-learning diagnosis features in train mode", "mode", [BC_MODE]),
    M("classes", "methods/remix.py", "        for mod in modules:\n            mod.eval()\n        idxs, rows = [], []",
      "        idxs, rows = [], []", "remix assignment scores in train mode", "mode", [BC_MODE]),
    M("classes", "methods/smv.py", "            mod.eval()\n        keys, rows = [], []", "            pass\n        keys, rows = [], []",
      "SMV sample valuation in train mode", "mode", [BC_MODE]),
    M("classes", "methods/lfm.py", "        for m in modules:\n            m.eval()\n", "",
      "LFM held-out pass in train mode", "mode", [BC_MODE]),
    M("classes", MS, "        model.eval()\n        probes.eval()\n", "        probes.eval()\n",
      "MSLR held-out metric with the model in train mode", "mode", [BC_MODE]),
    M("classes", MR, "drop = torch.rand(batch_size, generator=generator) < hp.p_drop",
      "drop = torch.rand(batch_size) < hp.p_drop", "MRD drop decision from the global RNG", "rng-source", [BC_RNG]),
    M("classes", "methods/opm.py", "u = torch.rand((rows, q.numel()), generator=generator, device=dev)",
      "u = torch.rand((rows, q.numel()), device=dev)", "OPM drop draws from the global RNG", "rng-source", [BC_RNG]),
    M("classes", "methods/cml.py", "order = torch.rand(n, n_modalities, generator=generator, device=device)",
      "order = torch.rand(n, n_modalities, device=device)", "CML removal order from the global RNG", "rng-source",
      [BC_RNG]),
    M("classes", "methods/remix.py", "perm = grp.indices[torch.randperm(len(grp.indices), generator=g)]",
      "perm = grp.indices[torch.randperm(len(grp.indices))]", "remix group order from the global RNG", "rng-source",
      [BC_RNG]),
    M("classes", OG, "[torch.randn(g.shape, generator=generator, device=g.device, dtype=torch.float32) for g in grads]",
      "[torch.randn(g.shape, device=g.device, dtype=torch.float32) for g in grads]", "OGM-GE noise from the global RNG",
      "rng-source", [BC_RNG]),
    M("classes", "methods/smv.py", "picks = torch.randint(n, (r,), generator=generator)", "picks = torch.randint(n, (r,))",
      "SMV sampled subsets from the global RNG", "rng-source", [BC_RNG]),
    M("classes", "mmbalance/teachers.py", '"model": {"name": name, "kwargs": kwargs}, "train": config.train, "seed": config.seed}',
      '"model": {"name": name, "kwargs": kwargs}, "train": config.train}',
      "teacher cache key without the seed (every seed shares seed 0's teacher)", "state-reset",
      ["tests/test_bug_classes.py::test_teacher_cache_key_changes_with_everything_that_changes_the_teacher"]),
    M("classes", EN, "                if self.accelerator.scaler is not None:  # read every step: a test may inject one\n"
      "                    self._unscale(all_opts)  # every sub-step is a real step: unscaled once, stepped, scale updated\n"
      "                if diag is not None:\n                    diag.after_backward()\n"
      "                if after_backward is not None:\n                    after_backward(ctx)\n",
      "                if diag is not None:\n                    diag.after_backward()\n"
      "                if after_backward is not None:\n                    after_backward(ctx)\n"
      "                if self.accelerator.scaler is not None:  # read every step: a test may inject one\n"
      "                    self._unscale(all_opts)  # every sub-step is a real step: unscaled once, stepped, scale updated\n",
      "fp16: the method's gradient edits run before the gradients are unscaled", "wrong-quantity",
      ["tests/test_bug_classes.py::test_gradient_edits_see_unscaled_gradients_under_fp16", "tests/test_precision.py"]),
    M("classes", "mmbalance/data/batching.py", "    for start in range(0, total, chunk):\n",
      "    for start in range(0, total - chunk + 1, chunk):\n",
      "evaluation drops the last partial batch of an in-memory split", "eval-drop", [BC_EVAL]),
    M("classes", EN, "                    k = max(0, min(len(labels), n - start))\n",
      "                    k = max(0, min(len(labels), n - start - 1))\n",
      "evaluation trims one sample too many from every gathered batch", "eval-drop", [BC_EVAL]),
    M("classes", EN, "split, self.cfg.eval_batch_size, shuffle=False, seed=0, num_workers=self.cfg.num_workers,",
      "split, self.cfg.eval_batch_size, shuffle=False, seed=0, num_workers=self.cfg.num_workers, drop_last=True,",
      "evaluation DataLoader drops the last partial batch", "eval-drop", [BC_EVAL]),
    M("classes", QM, "        return self._fused(ctx, logits, self._confidences(ctx, logits), detach=True)\n",
      "        return fuse(logits, self._confidences(ctx, logits), True)\n",
      "QMF predict with the unclamped confidences (a negative confidence inverts a modality's vote)", "predict-path",
      [BC_PRED]),
    M("classes", AU, "term = (self.alpha[m] / total) * heads(", "term = (1.0 / len(present)) * heads(",
      "AUG predict averages the ensembles instead of weighting them by alpha", "predict-path", [BC_PRED]),
    M("classes", "methods/mla.py", "w = entropy_weights(outputs, self.hp.entropy_axis)",
      "w = torch.full((len(outputs),), 1.0 / len(outputs))",
      "MLA predict averages the modalities' outputs instead of the entropy-weighted sum", "predict-path", [BC_PRED]),
    M("classes", RB, "        return ctx.forward(batch, absent).logits\n", "        return ctx.forward(batch, absent).fused.sum(dim=1)\n",
      "ReconBoost predict sums the learners without the boost rate beta", "predict-path", [BC_PRED]),
    M("classes", "methods/mmpareto.py", "        self._sums, self._steps = {}, 0\n",
      "        self._sums, self._steps = getattr(self, '_sums', {}), getattr(self, '_steps', 0)\n",
      "MMPareto's per-epoch sums and step count not reset (the epoch means run over all epochs so far)",
      "state-reset", [BC_EPOCH]),
    M("classes", MR, "        self.drop_counts = torch.zeros(len(ctx.modalities), dtype=torch.float64)\n",
      "        self.drop_counts = getattr(self, 'drop_counts', None)\n"
      "        if self.drop_counts is None:\n"
      "            self.drop_counts = torch.zeros(len(ctx.modalities), dtype=torch.float64)\n",
      "MRD's per-epoch drop counts not reset (the sample count is)", "state-reset", [BC_EPOCH]),
    M("classes", MS, "        self.running = {m: [0.0, 0.0] for m in self.modalities}\n",
      "        self.running = getattr(self, 'running', None) or {m: [0.0, 0.0] for m in self.modalities}\n",
      "MSLR's running training metric not reset at the epoch start", "state-reset", [BC_EPOCH]),
    M("classes", "methods/inforeg.py",
      "        self.fisher = torch.zeros(len(self.mods), dtype=torch.float64, device=dev)\n",
      "        self.fisher = getattr(self, 'fisher', None)\n        if self.fisher is None:\n"
      "            self.fisher = torch.zeros(len(self.mods), dtype=torch.float64, device=dev)\n",
      "InfoReg's per-epoch Fisher trace not reset (each epoch's trace includes the epochs before)", "state-reset",
      [BC_EPOCH]),
    M("classes", OP, "        self._dropped, self._rows = None, 0\n", "        pass\n",
      "OPM's per-epoch drop counts not reset", "state-reset", [BC_EPOCH]),
    M("classes", OG, "        k = self.k if active else {m: 1.0 for m in self.modalities}\n"
      "        if self.hp.apply_to == \"lr\":\n            for g in ctx.optimizer.param_groups:\n"
      "                if \"modality\" in g:\n                    g[\"lr_mult\"] = k.get(g[\"modality\"], 1.0)\n"
      "        if not active:\n            return\n",
      "        k = self.k\n        if not active:\n            return\n"
      "        if self.hp.apply_to == \"lr\":\n            for g in ctx.optimizer.param_groups:\n"
      "                if \"modality\" in g:\n                    g[\"lr_mult\"] = k.get(g[\"modality\"], 1.0)\n",
      "OGM-GE (apply_to=lr): lr multipliers only written inside the window (the last one stays after it)",
      "state-reset", [BC_WINDOW]),
    M("classes", PM, "        return self.hp.start_epoch <= ctx.epoch <= end\n", "        return self.hp.start_epoch <= ctx.epoch\n",
      "PMR's prototype terms still applied after the window's end", "state-reset", [BC_WINDOW]),
    M("classes", PM, "logits = prototype_logits(z, self.prototypes[j, :, : z.shape[1]].to(z.device))",
      "logits = prototype_logits(z.detach(), self.prototypes[j, :, : z.shape[1]].to(z.device))",
      "PMR's prototype loss detached from the encoder (it never reaches it)", "detach", [BC_FLOW]),
    M("classes", CG, "feats = {m: _detach(out.features[m]) for m in self.modalities}",
      "feats = {m: out.features[m] for m in self.modalities}",
      "CGGM's classifiers trained on the live features (their loss trains the encoders)", "detach", [BC_FLOW]),
    M("classes", CG, "cos = [_cos(g_m.detach(), self._block(g_f, m)) for g_m, m in zip(g_ms, self.modalities)]",
      "cos = [_cos(g_m.detach(), self._block(g_f.detach(), m)) for g_m, m in zip(g_ms, self.modalities)]",
      "cggm_paper: the fused head's gradient detached in L_gm (the direction term trains nothing)", "detach", [BC_FLOW]),
    M("classes", CG, "        hit = s.abs() < guard_tol\n", "        hit = s < guard_tol\n",
      "CGGM's guard on the signed sum (every negative denominator guarded)", "sign", BC_GUARD),
    M("classes", AG, "        diff = diff.clamp(max=cap)\n", "        diff = diff.clamp(-cap, cap)\n",
      "AGM's exponent cap applied to both sides (the damping side clipped too)", "wrong-quantity", BC_GUARD),
    M("classes", AU, "return (self._unimodal(ctx, batch, k, m) for k, m in enumerate(ctx.modalities))",
      "return (self._unimodal(ctx, batch, k, m) for k, m in zip(range(len(ctx.modalities)), ctx.modalities[::-1]))",
      "AUG: sub-step k trains another modality's learner (its own statistics slot)", "swapped", [BC_SUBSTEP]),
    M("classes", "methods/mla.py", "        return (self._unimodal(ctx, batch, m) for m in ctx.modalities)\n",
      "        return (self._unimodal(ctx, batch, ctx.modalities[0]) for m in ctx.modalities)\n",
      "MLA: every sub-step trains the first modality's encoder", "swapped", [BC_SUBSTEP]),
    M("classes", GR, "        model.set_rebalance(st.caring)\n",
      "        model.set_rebalance(None if st.caring is None else len(self._mods) - 1 - st.caring)\n",
      "Greedy: a re-balancing step freezes the other branch's gates (the caring branch keeps learning its bypass)",
      "wrong-learner", [BC_STAGE]),
    M("classes", RB, 'if info.kind != "boost":  # phase 2', 'if info.kind == "rectify":  # phase 2',
      "ReconBoost: the evaluated rectification epoch runs the boosting step (only f_m and H learn, not the "
      "other encoders nor beta)", "wrong-learner", [BC_STAGE]),
    M("classes", UT, "student.encoders[m].load_state_dict(teacher.encoders[m].state_dict())",
      "teacher.encoders[m].load_state_dict(student.encoders[m].state_dict())",
      "UMT student_init=teacher: the hand-over copies the student's initial encoder into the teacher",
      "wrong-learner", [BC_STAGE]),
    M("classes", OG, "p = um.softmax(1).gather(1, y.long()[:, None]).squeeze(1)",
      "p = um.flatten(2).mean(2)[..., None, None].expand_as(um).softmax(1).gather(1, y.long()[:, None]).squeeze(1)",
      "OGM-GE segmentation score from the image's mean logits (one class distribution per image)", "units",
      [BC_PIXEL]),
    M("classes", AR, "    mag = x.abs().sum(2)\n", "    x = x.flatten(3).mean(3) if x.dim() > 3 else x\n    mag = x.abs().sum(2)\n",
      "ARL segmentation magnitude and entropy of the image's mean logits instead of per pixel", "units", [BC_PIXEL]),
    M("classes", "methods/mla.py",
      "e = torch.stack([-(F.softmax(o.float(), 1) * F.log_softmax(o.float(), 1)).sum(1) for o in outputs])\n",
      "e = torch.stack([-(F.softmax(o.float(), 1) * F.log_softmax(o.float(), 1)).sum(1) for o in outputs])\n"
      "        e = e if e.dim() < 3 else e.flatten(2).mean(2)[..., None, None].expand_as(e)\n",
      "MLA segmentation fusion weights from one entropy per image (the mean over its pixels)", "units", [BC_PIXEL]),
    M("classes", AG, "count = float(y.numel())", "count = float(y.shape[0])",
      "AGM segmentation score: the pixel CE sum divided by the image count", "units", [BC_PIXEL]),
    M("classes", RB, "return logits.softmax(dim=1).gather(1, y.long().unsqueeze(1)).squeeze(1)",
      "return logits.softmax(dim=-1).gather(1, y.long().unsqueeze(1)).squeeze(1)",
      "ReconBoost agreement normalised over the last axis (the image width for maps, not the classes)", "units",
      [BC_PIXEL]),
    M("classes", "mmbalance/tasks.py", "return total, total.new_full((), float(target.shape[0]))",
      "return total, total.new_full((), float(target.numel()))",
      "segmentation batch score (CGGM's epsilon, MSLR's metric): the per-slice Dice sum divided by the pixel count",
      "units", [BC_PIXEL]),
    M("classes", LF, "    logp = torch.stack([F.log_softmax(x.float(), dim=1) for x in u.values()])",
      "    logp = torch.stack([F.log_softmax(x.float().flatten(2).mean(2) if x.dim() > 2 else x.float(), dim=1) "
      "for x in u.values()])",
      "LFM segmentation alignment between the images' mean logits (one distribution per image)", "units", [BC_PIXEL]),
    M("classes", MB, "    w = correct.to(q_s.dtype) * (q_s - q_w)  # :148-151\n",
      "    w = correct.to(q_s.dtype) * (q_s - q_w)  # :148-151\n"
      "    w = w.flatten(1).mean(1).view(-1, *[1] * (w.dim() - 1)).expand_as(w) if w.dim() > 1 else w\n",
      "MBSD segmentation sample weight: one per image (the mean over its pixels)", "units", [BC_PIXEL]),
    M("classes", AU, "        return torch.softmax(o.float(), 1).gather(1, yl.unsqueeze(1)).squeeze(1)\n",
      "        return torch.softmax(o.float(), -1).gather(1, yl.unsqueeze(1)).squeeze(1)\n",
      "AUG confidence normalised over the last axis (the image width for maps, not the classes)", "units",
      [BC_PIXEL]),
    M("classes", MS, "return task.region_dice(task.prediction(u), y.long()).mean(1).double()",
      "return task.region_dice(task.prediction(u), y.long()).mean().expand(u.shape[0]).double()",
      "MSLR per-sample segmentation metric: one batch-pooled Dice for every slice", "units", [BC_PIXEL]),
    M("classes", AG, "self.s_bar = s_bar * (self.t - 1) / self.t + s / self.t",
      "self.s_bar = s_bar * (self.t - 1) / self.t + s.flip(0) / self.t",
      "AGM: each modality's running mean S-bar fed the other modality's score", "swapped", BC_RUNNING),
    M("classes", GR, "parts = list(torch.split(total[:-1], block.dims))",
      "parts = list(torch.split(total[:-1], block.dims))[::-1]",
      "Greedy: each branch's running gate average fed the other branch's gate (the official bug)", "swapped",
      BC_RUNNING),
    M("classes", PM, "                    z, y = self._pooled_and_labels(ctx, out, batch[\"label\"], m)\n"
      "                    sums[j",
      "                    z, y = self._pooled_and_labels(ctx, out, batch[\"label\"], mods[-1 - j])\n"
      "                    sums[j",
      "PMR: modality m's prototypes accumulated from the other modality's embeddings", "swapped", BC_RUNNING),
    M("classes", MS_, "ma_new = torch.where(started, beta * ma + (1 - beta) * loss, loss)",
      "ma_new = torch.where(started, beta * ma + (1 - beta) * loss.flip(0), loss)",
      "MASAM: each modality's loss EMA fed the other modality's loss", "swapped", BC_RUNNING),
    M("classes", QM, "self.history.index_add_(1, idx.long(), losses.t())",
      "self.history.index_add_(1, idx.long(), losses.t().flip(0))",
      "QMF: each modality's per-sample loss history fed the other modality's losses", "swapped", BC_RUNNING),
    M("classes", MS, "            r = self.mem[m].update(a[m])\n",
      "            r = self.mem[m].update(a[self.modalities[-1 - self.modalities.index(m)]])\n",
      "MSLR: each modality's metric memory fed the other modality's metric", "swapped", BC_RUNNING),
    M("classes", "methods/multitask.py", "            gammas = [g / len(mods) for g in gammas]\n",
      "            gammas = [g for g in gammas]\n", "multitask reduction=mean sums the unimodal losses (no ÷M)",
      "wrong-quantity", [BC_AUX]),
    M("classes", "methods/multitask.py", "self.gammas = dict(zip(mods, gammas))", "self.gammas = dict(zip(mods, gammas[::-1]))",
      "multitask gamma_per_modality applied in reverse modality order", "swapped", [BC_AUX]),
    M("classes", CG, 'aux_loss = aux_sum / len(self.modalities) if hp.aux_loss_reduction == "mean" else aux_sum',
      "aux_loss = aux_sum / len(self.modalities)", "CGGM's classifier losses averaged by default (official: summed)",
      "wrong-quantity", [BC_AUX]),
    M("classes", "methods/dgl.py", "loss = loss_fused + self.hp.alpha * sum(losses.values())",
      "loss = loss_fused + self.hp.alpha * sum(losses.values()) / len(losses)",
      "DGL's unimodal losses averaged over the modalities (official: summed)", "wrong-quantity", [BC_AUX]),
    M("classes", UT, "                total = total + mse\n", "                total = total + mse / len(ctx.modalities)\n",
      "UMT's distillation averaged over the modalities (documented: summed)", "wrong-quantity", [BC_AUX]),
    M("classes", "methods/mmpareto.py", "        loss = loss_fused + sum(losses.values())\n",
      "        loss = loss_fused + sum(losses.values()) / len(losses)\n",
      "MMPareto's unimodal losses averaged over the modalities (official: summed)", "wrong-quantity", [BC_AUX]),
    M("classes", "methods/inforeg.py", "        loss = loss_fused + sum(losses.values())\n",
      "        loss = loss_fused + sum(losses.values()) / len(losses)\n",
      "InfoReg's unimodal losses averaged over the modalities (official: summed)", "wrong-quantity", [BC_AUX]),
    M("classes", AR, "        loss = loss_fused + gamma * sum(losses.values())\n",
      "        loss = loss_fused + gamma * sum(losses.values()) / len(losses)\n",
      "ARL's unimodal losses averaged over the modalities (official: summed)", "wrong-quantity", [BC_AUX]),
    M("classes", "methods/remix.py", "loss = fused + sum(self.hp.warmup_weight * lm for lm in losses.values())",
      "loss = fused + self.hp.warmup_weight * sum(losses.values()) / len(losses)",
      "ReMix's warm-up unimodal losses averaged (official: warmup_weight per modality, summed)", "wrong-quantity",
      [BC_AUX]),
    M("classes", MR, "p = torch.tensor(hp.p_per_modality if hp.p_per_modality is not None",
      "p = torch.tensor(hp.p_per_modality[::-1] if hp.p_per_modality is not None",
      "MRD p_per_modality applied in reverse modality order", "swapped", [BC_ORDER]),
    M("classes", "methods/mla.py", "a = torch.tensor([all_w[ctx.modalities.index(m)] for m in present]",
      "a = torch.tensor([all_w[len(ctx.modalities) - 1 - ctx.modalities.index(m)] for m in present]",
      "MLA fixed_weights applied in reverse modality order", "swapped", [BC_ORDER]),
    M("classes", AU, "self.alpha = dict(zip(ctx.modalities, (float(x) for x in w)))",
      "self.alpha = dict(zip(ctx.modalities[::-1], (float(x) for x in w)))",
      "AUG merge_weights applied in reverse modality order", "swapped", [BC_ORDER]),
    M("classes", MS, "            return {m: float(v) for m, v in zip(modalities, c0)}\n",
      "            return {m: float(v) for m, v in zip(modalities[::-1], c0)}\n",
      "MSLR c0 list applied in reverse modality order", "swapped", [BC_ORDER]),
    M("classes", "methods/inforeg.py", "                self._fixed_c = torch.tensor(c, dtype=torch.float64, device=dev)\n",
      "                self._fixed_c = torch.tensor(c[::-1], dtype=torch.float64, device=dev)\n",
      "InfoReg c_fixed applied in reverse modality order", "swapped", [BC_ORDER]),
    M("classes", GB, "            w = torch.tensor(self.hp.weights, dtype=torch.float64)\n",
      "            w = torch.tensor(self.hp.weights[:-1][::-1] + self.hp.weights[-1:], dtype=torch.float64)\n",
      "G-Blending fixed weights: the per-modality weights in reverse modality order", "swapped", [BC_AUX]),
    M("classes", "methods/dgl.py", "        return _detach_tree(args)\n", "        return None\n",
      "DGL: the fused loss reaches the encoders (fusion inputs not detached)", "detach", [BC_FLOW]),
    M("classes", "methods/dgl.py", "                                   detach_shared=True)",
      "                                   detach_shared=False)",
      "DGL: the unimodal losses train the shared head (its weights not detached)", "detach", [BC_FLOW]),
    # ---------------------------------------------------------------- MMPareto
    M("mmpareto", "methods/mmpareto.py",
      '            flat = ctx.accelerator.reduce(flat, reduction="sum") / ctx.world_size\n', "            pass\n",
      "fused-loss encoder gradient from this rank's batch only (autograd.grad bypasses DDP's all-reduce)",
      "rank-local"),
    # ---------------------------------------------------------------- G2D
    M("g2d", GD, "        s = ctx.reduce_sum(self._rho)\n", "        s = self._rho.double()\n",
      "SMP choice from this rank's teacher confidences only", "rank-local"),
    M("g2d", GD, "        return (rho > low).to(torch.float32)", "        return (rho < rho.max()).to(torch.float32)",
      "SMP suppresses the less confident modality", "sign"),
    M("g2d", GD, "factors.append(keep[k])", "factors.append(keep[len(self.mods) - 1 - k])",
      "suppression applied to the other modality's encoder", "swapped"),
    M("g2d", GD, "    log_q = F.log_softmax(s / tau, dim=1)", "    log_q = F.log_softmax(s, dim=1)",
      "temperature not applied to the student", "wrong-quantity"),
    M("g2d", GD, "    s, t = student.float(), teacher.detach().float()", "    s, t = student.detach().float(), teacher.detach().float()",
      "logit distillation detached from the student", "detach"),
    M("g2d", GD, "self.hp.smp_start <= ctx.epoch <= end", "self.hp.smp_start <= ctx.epoch < end",
      "SMP window ends one epoch early", "off-by-one"),
    M("g2d", GD, '"weights": lambda p: p.dim() >= 2', '"weights": lambda p: p.dim() >= 1',
      "biases and norm parameters suppressed too", "wrong-quantity"),
    # ---------------------------------------------------------------- MMCosine
    M("mmcosine", MC, "        w_hat = F.normalize(weight.float(), dim=1)", "        w_hat = F.normalize(weight.float(), dim=0)",
      "class weights normalised per feature column instead of per class row", "wrong-quantity"),
    M("mmcosine", MC, "return F.normalize(x.view(x.shape[0], len(widths), widths[0]), dim=2).view(x.shape[0], -1)",
      "return F.normalize(x.view(x.shape[0], len(widths), widths[0]), dim=1).view(x.shape[0], -1)",
      "training-path blocks normalised across modalities instead of within each block", "wrong-quantity"),
    M("mmcosine", MC, "        z_hat = F.normalize(z.float(), dim=1)",
      "        z_hat = z.float() / z.float().norm(dim=1, keepdim=True).detach().clamp_min(1e-12)",
      "feature norm taken on a detached copy", "detach"),
    M("mmcosine", MC, "                bias.requires_grad_(False)", "                pass",
      "fused-head bias left trainable (and a DDP parameter that never gets a gradient)", "wrong-quantity"),
    # ---------------------------------------------------------------- MBSD
    M("mbsd", MB, "return torch.where(q_l > q_j, q_l, q_j), torch.where(q_l < q_j, q_l, q_j)",
      "return torch.maximum(q_j, q_l), torch.minimum(q_j, q_l)", "ties split between the modalities", "swapped"),
    M("mbsd", MB, "w = correct.to(q_s.dtype) * (q_s - q_w)", "w = correct.to(q_s.dtype) * (q_s - q_w).detach()",
      "sample weight detached by default (BalanceBenchmark's w carries gradient)", "detach"),
    M("mbsd", MB, "        div = q_w * (lq_w - q_s)", "        div = q_w * (lq_w - q_w)", "KL-named term with the weak "
      "probability in both places", "wrong-quantity"),
    M("mbsd", MB, "correct = (u_j.argmax(1) == y) | (u_l.argmax(1) == y)",
      "correct = (u_j.argmax(1) == y) & (u_l.argmax(1) == y)", "gate needs both heads right", "wrong-quantity"),
    M("mbsd", MB, "return self.hp.start_epoch <= epoch and", "return self.hp.start_epoch <= epoch + 1 and",
      "window opens one epoch early", "off-by-one"),
    # ---------------------------------------------------------------- MASAM
    M("masam", SAM, '        flat = accelerator.reduce(flat, reduction="sum") / accelerator.num_processes', "        pass",
      "clean gradients from this rank's batch only (autograd.grad bypasses DDP)", "rank-local"),
    M("masam", MS_, "        sums = ctx.reduce_sum(torch.stack(", "        sums = (torch.stack(",
      "EMA losses from this rank's batch only", "rank-local"),
    M("masam", MS_, "torch.argmax(score)", "torch.argmin(score)", "the weakest encoder is perturbed", "sign"),
    M("masam", MS_, "coef = torch.where(dot >= 0,", "coef = torch.where(dot < 0,", "projection used on conflict", "sign"),
    M("masam", MS_, "score = self.hp.score_weight * d + (1 - self.hp.score_weight) * s.double()",
      "score = self.hp.score_weight * s.double() + (1 - self.hp.score_weight) * d", "score weights swapped", "swapped"),
    M("masam", MS_, "d = torch.where(started, (last - ma_new).clamp_min(0), torch.zeros_like(loss))",
      "d = torch.where(started, (ma_new - last).clamp_min(0), torch.zeros_like(loss))", "loss decay with the wrong sign",
      "sign"),
    M("masam", MS_, "                p.grad.copy_(g)", "                pass",
      "heads and fusion keep the perturbed gradient", "wrong-quantity"),
    M("masam", MS_, "gamma = torch.where(c > 0, c, torch.ones_like(c))", "gamma = torch.ones_like(c)",
      "perturbation size without the cosine factor", "wrong-quantity"),
    M("masam", MS_, '_STATE = ("ma", "last", "started", "score", "d", "s")', '_STATE = ("ma", "last", "score", "d", "s")',
      "EMA started flag not checkpointed (re-initialised on resume)", "state-reset"),
    M("masam", MS_, "        with ctx.frozen_norm_stats():", "        if True:",
      "second forward updates the normalisation statistics", "mode"),
    M("masam", SAM, "        flat = flat / scale.float()", "        pass", "fp16: clean gradients left scaled",
      "wrong-quantity"),
    # ---------------------------------------------------------------- AUG
    M("aug", AU, "S = ctx.reduce_sum(self._S).tolist()", "S = self._S.tolist()",
      "assignment from this rank's confidences only", "rank-local"),
    M("aug", AU, "        if r > assign_lambda + margin:\n            return [1]",
      "        if r > assign_lambda + margin:\n            return [0]", "the stronger modality gets the member", "sign"),
    M("aug", AU, "weight = 1 - lam * confidence(P).detach()", "weight = 1 - lam * confidence(P)",
      "residual weight not detached", "detach"),
    M("aug", AU, '        return {"K": dict(self.K), "pending": list(self.pending)}',
      '        return {"K": dict(self.K), "pending": []}', "pending assignment lost on resume", "state-reset"),
    M("aug", AU, "        self._S = torch.zeros(len(ctx.modalities), dtype=torch.float64, device=ctx.device)",
      "        self._S = self._S if self._S is not None else torch.zeros(len(ctx.modalities), dtype=torch.float64, "
      "device=ctx.device)", "confidence sum not reset at the epoch start", "state-reset"),
    M("aug", AU, "        self.pending = []\n        self._S = torch.zeros", "        self._S = torch.zeros",
      "pending member applied again at every later epoch start", "state-reset"),
    M("aug", AU, "if ctx.epoch in self.checks:", "if ctx.epoch + 1 in self.checks:", "check one epoch early",
      "off-by-one"),
    M("aug", AU, 'term = (self.alpha[m] / total) * heads(*self._head_input(out, m, batch["label"]))[0].float()',
      'term = (self.alpha[m] / total) * heads(*self._head_input(out, present[-1], batch["label"]))[0].float()',
      "the prediction sums the last present modality's ensemble M times", "swapped"),
    M("aug", AU, "                    g.requires_grad_(False)", "                    pass",
      "aug_released trains the added members", "wrong-quantity"),
    # ---------------------------------------------------------------- OPM
    M("opm", OP, "s = ctx.reduce_sum(s_local.detach())", "s = s_local.detach().double()",
      "drop probabilities from this rank's scores only", "rank-local"),
    M("opm", OP, "keep = keep_global[rank * B:(rank + 1) * B]", "keep = keep_global[:B]",
      "every rank takes the first rows of the global mask", "rank-local"),
    M("opm", OP, "if self._y is None or not module.training:", "if self._y is None:",
      "the drop also acts in eval mode", "wrong-split"),
    M("opm", OP, "return torch.where(rho > 1, q, torch.zeros_like(q))", "return torch.where(rho < 1, q, torch.zeros_like(q))",
      "the weaker modality is dropped", "sign"),
    M("opm", OP, 'live = hp.theta_grad == "official"', "live = True",
      "scores not detached: the released spurious θ gradient in the default", "detach"),
    M("opm", OP, "out[m] = z * (col[:, None]", "out[m] = z.flip(0) * (col[:, None]", "masks applied to other rows", "swapped"),
    M("opm", OP, "factor = rescale_factors(q, dims, hp.rescale, theta)", "factor = rescale_factors(q, dims.flip(0), hp.rescale)",
      "θ weights q by the other modality's width", "swapped"),
    # ---------------------------------------------------------------- SMV
    M("smv", SV, "mult = ((t == -1) | (t == self._cols[None, :]))", "mult = ((t == -1) | (t == self._cols.flip(0)[None, :]))",
      "a copy keeps the other modality", "swapped"),
    M("smv", SV, "            mod.eval()\n", "            pass\n", "valuation in train mode (dropout)", "wrong-split"),
    M("smv", SV, "feats = {m: (z if m in present else z * 0)", "feats = {m: (z if m not in present else z * 0)",
      "the subset's complement is evaluated", "swapped"),
    M("smv", SV, "                if ctx.world_size > 1:\n                    key, phi", "                if False:\n                    key, phi",
      "φ of this rank's shard only (no all-gather)", "rank-local"),
    M("smv", SV, "    c[(phi > 0.4) & (phi < 1)] = 1", "    c[(phi >= 0.4) & (phi < 1)] = 1", "threshold 0.4 inclusive", "off-by-one"),
    M("smv", EN, "rows = rows[..., torch.randperm(len(idx), generator=g)]",
      "rows = torch.stack([rows[0][torch.randperm(len(idx), generator=g)], rows[1]]) if rows.dim() == 2 else "
      "rows[torch.randperm(len(idx), generator=g)]", "plan tags not permuted with their indices", "swapped"),
    # ---------------------------------------------------------------- LFM
    M("lfm", LF, '    if kind == "js":', '    if kind != "js":', "the released divergence as the default", "wrong-quantity"),
    M("lfm", LF, "return a_cls, min(1.0, max(0.0, 1.0 - a_cls))", "return a_cls, 1.0 - a_cls",
      "negative alignment weight (no clamp)", "sign"),
    M("lfm", LF, "fused = sum(x.float() for x in u.values()) / len(u)", "fused = sum(x.float() for x in u.values())",
      "sum fusion instead of the mean", "wrong-quantity"),
    M("lfm", LF, "loss = 2 * (self.alpha_cls", "loss = (self.alpha_cls", "official factor 2 dropped", "wrong-quantity"),
    M("lfm", LF, "        for m in modules:\n            m.eval()", "        for m in modules:\n            m.train()",
      "hypergradient step in train mode (BatchNorm statistics move)", "wrong-split"),
    M("lfm", LF, 'if e > 0 and e % self.hp.halve_every == 0:', 'if e % self.hp.halve_every == 0:',
      "lr_α halved at epoch 0", "off-by-one"),
    M("lfm", LF, "logp = torch.stack([F.log_softmax(x.float(), dim=1) for x in u.values()])",
      "logp = torch.stack([torch.log(F.softmax(x.float(), dim=1)) for x in u.values()])",
      "log(softmax) underflows to -inf", "wrong-quantity"),
    # ---------------------------------------------------------------- AMCo
    M("amco", AM, "tot = ctx.reduce_sum(torch.cat([num.double(), rows.double().reshape(1)]))",
      "tot = torch.cat([num.double(), rows.double().reshape(1)])", "dependency from this rank's shares only", "rank-local"),
    M("amco", AM, "self.flags = shares > self.hp.sigma + 1e-9", "self.flags = shares >= self.hp.sigma",
      "non-strict threshold", "off-by-one"),
    M("amco", AM, "        self.ell = 0.0\n        self.flags = torch.zeros", "        self.flags = torch.zeros",
      "ramp not reset at the epoch start", "state-reset"),
    M("amco", AM, "self.ell += ctx.epoch / 10", "self.ell += ctx.epoch", "ramp 10x too fast", "wrong-quantity"),
    M("amco", AM, "torch.where(self.flags[k], make", "torch.where(self.flags[len(self.mods) - 1 - k], make",
      "the other modality is masked", "swapped"),
    M("amco", AM, "if self._masks is None or not module.training:", "if self._masks is None:",
      "masks act in eval mode", "wrong-split"),
    # ---------------------------------------------------------------- MIDAS
    M("midas", MI, "                stats = ctx.reduce_sum(local)", "                stats = local.double()",
      "alpha statistics from this rank's batch only", "rank-local"),
    M("midas", MI, "    delta = (c_sum[m_hat] - r_sum[m_hat]) / n", "    delta = (r_sum[m_hat] - c_sum[m_hat]) / n",
      "alpha moves with the sign flipped", "sign"),
    M("midas", MI, "    m_hat = c_sum.argmin()", "    m_hat = c_sum.argmax()",
      "alpha raised for the most confident modality", "wrong-quantity"),
    M("midas", MI, "        with torch.no_grad():  # targets and weights are constants (§3.3, §3.5)\n"
      "            conf = torch.stack([um.detach().float()",
      "        if True:\n            conf = torch.stack([um.float()",
      "soft-label confidences not detached (the misaligned loss trains the unimodal heads)", "detach"),
    M("midas", MI, "        with torch.no_grad():  # targets and weights are constants (§3.3, §3.5)\n",
      "        if True:\n", "hard-sample weight not detached (gradient through the cosine)", "detach"),
    M("midas", MI, "        replaced = (src[:, k] != anchor).float()", "        replaced = (src[:, k] == anchor).float()",
      "hard-sample similarity from the kept modality instead of the replaced one", "swapped"),
    M("midas", MI, "        if ctx.epoch < self.warmup(ctx):", "        if ctx.epoch <= self.warmup(ctx):",
      "warm-up one epoch too long", "off-by-one"),
    M("midas", MI, '        return {"alpha": None if self.alpha is None else self.alpha.detach().cpu(), "t": self.t}',
      '        return {"alpha": None, "t": self.t}', "alpha not checkpointed (lost on resume)", "state-reset"),
    M("midas", MI, "    return -h * (alpha[None, :] * c * picked).sum(1)", "    return -h * (c * picked).sum(1)",
      "weak-modality weight never applied to the target", "wrong-quantity"),
]

for _i, _m in enumerate(MUTANTS):
    _m.id = f"{_m.method}-{sum(1 for x in MUTANTS[:_i] if x.method == _m.method) + 1:02d}"


# ------------------------------------------------------------------------------------------ running
def check(mutants: list[Mutant], root: Path = REPO) -> list[str]:
    """Mutants whose original snippet does not occur exactly once (stale)."""
    bad = []
    for m in mutants:
        text = (root / m.file).read_text()
        n = text.count(m.original)
        if n != 1:
            bad.append(f"{m.id}: snippet occurs {n}x in {m.file}")
    return bad


def copy_tree(dest: Path, rev: str | None = None) -> None:
    """Tracked and untracked-but-not-ignored files of the working tree → ``dest`` (no .git); with
    ``rev``, the files of that git revision instead (e.g. to score the suite of an older commit)."""
    if rev is not None:
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev], cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest), "--exclude=leaderboard/results"], input=archive, check=True)
        return
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in files:
        if not f or f.startswith("leaderboard/results/"):
            continue
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def existing_targets(tree: Path, targets: list[str]) -> list[str]:
    """Drop test nodes that do not exist in ``tree`` (e.g. scoring an older revision of the suite)."""
    out = []
    for t in targets:
        file, _, node = t.partition("::")
        if not (tree / file).is_file():
            continue
        text = (tree / file).read_text()
        if node and f"def {node.split('[')[0]}(" not in text:
            continue
        if "[" in node and f'"{node.split("[")[1].rstrip("]")}"' not in text:
            continue
        out.append(t)
    return out


def run_tests(tree: Path, targets: list[str], timeout: float) -> tuple[int | None, float, str]:
    targets = existing_targets(tree, targets)
    env = {**os.environ, "PYTHONPATH": str(tree), "MMBALANCE_NO_PROGRESS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("MMBALANCE_DUMP_PARAMS_DIR", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *targets]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, time.perf_counter() - t0, (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t0, "timeout"


def run_mutant(m: Mutant, tree: Path, timeout: float) -> dict:
    path = tree / m.file
    original = path.read_text()
    if original.count(m.original) != 1:
        return {**asdict(m), "status": "stale", "seconds": 0.0, "tail": ""}
    path.write_text(original.replace(m.original, m.mutated))
    try:
        rc, secs, tail = run_tests(tree, m.test_targets(), timeout)
    finally:
        path.write_text(original)
    status = ("killed" if rc in (1, 2, 3) else "survived" if rc == 0 else "timeout" if rc is None else f"rc{rc}")
    return {**asdict(m), "status": status, "returncode": rc, "seconds": round(secs, 1), "tail": tail}


def score_table(results: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in results))
    lines = [f"{'method':<12} {'killed':>6} / {'total':<5} {'score':>6}   survived", "-" * 72]
    for meth in methods:
        rs = [r for r in results if r["method"] == meth]
        killed = sum(r["status"] in {"killed", "timeout"} for r in rs)
        surv = [r["id"] for r in rs if r["status"] == "survived"]
        other = [f"{r['id']}({r['status']})" for r in rs if r["status"] not in {"killed", "timeout", "survived"}]
        lines.append(f"{meth:<12} {killed:>6} / {len(rs):<5} {killed / len(rs):>6.0%}   {' '.join(surv + other)}")
    tot = sum(r["status"] in {"killed", "timeout"} for r in results)
    lines.append("-" * 72)
    lines.append(f"{'all':<12} {tot:>6} / {len(results):<5} {tot / max(1, len(results)):>6.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", action="append", help="only this method's mutants (repeatable; 'engine' too)")
    ap.add_argument("--id", action="append", help="only these mutant ids (e.g. agm-03)")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (one scratch tree each)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant's test run (timeout = killed)")
    ap.add_argument("--json", type=Path, default=Path("runs/mutation.json"), help="where the results go")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--check", action="store_true", help="only check that every snippet matches once")
    ap.add_argument("--rev", help="score the tree of this git revision instead of the working tree")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated test run")
    args = ap.parse_args(argv)

    unknown = set(args.method or []) - set(TESTS)
    if unknown:
        print(f"unknown method(s) {sorted(unknown)}; known: {', '.join(TESTS)}", file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if (not args.method or m.method in args.method) and (not args.id or m.id in args.id)]
    if args.list:
        for m in chosen:
            print(f"{m.id:<14} {m.bug_class:<15} {m.file:<24} {m.description}")
        return 0
    stale = check(chosen) if args.rev is None else []
    if args.check or stale:
        print("\n".join(stale) or f"all {len(chosen)} snippets match exactly once")
        return 1 if stale else 0

    with tempfile.TemporaryDirectory(prefix="mmbalance-mutation-") as tmp:
        trees = []
        for k in range(max(1, args.jobs)):
            tree = Path(tmp) / f"tree{k}"
            copy_tree(tree, args.rev)
            trees.append(tree)
        if not args.no_baseline:  # the unmutated tree must pass, or every mutant would count as killed
            for meth in dict.fromkeys(m.method for m in chosen):
                rc, secs, tail = run_tests(trees[0], TESTS[meth] + DDP_TESTS.get(meth, []), args.timeout)
                print(f"baseline {meth}: rc={rc} ({secs:.0f} s)", flush=True)
                if rc != 0:
                    print(tail, file=sys.stderr)
                    return 1
        free = list(trees)
        results: list[dict] = []

        def work(m: Mutant) -> dict:
            tree = free.pop()
            try:
                r = run_mutant(m, tree, args.timeout)
            finally:
                free.append(tree)
            print(f"{r['id']:<14} {r['status']:<9} {r['seconds']:>6.1f} s  {m.description}", flush=True)
            return r

        with ThreadPoolExecutor(max_workers=len(trees)) as pool:
            results = list(pool.map(work, chosen))
    table = score_table(results)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp_json = args.json.with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps({"results": results, "table": table}, indent=1))
    os.replace(tmp_json, args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
