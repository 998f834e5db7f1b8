"""Mutation check: does the test suite catch a broken stage, not only a crashing one?

Each mutation below is one small, plausible bug in an important formula or in the wiring of a config
value into the method. The check copies the repository to a temporary folder, applies one mutation
at a time there (a textual search/replace that must match exactly once), runs the test files listed
for it with ``PYTHONPATH`` pointing at the copy, and reports whether the tests failed (= caught).
The working tree is never modified.

A mutation whose text is no longer found (the code moved or changed) is reported as
``pattern not found`` and counts as a failure of the check, so the list cannot rot silently:
update the entry (file, old text, new text, tests) when the code it targets is restructured.

Run before a release (docs/RELEASE_CHECKS.md)::

    python tools/mutation_check.py             # every mutation; exit 1 unless all are caught
    python tools/mutation_check.py --list      # names only
    python tools/mutation_check.py -k crf      # the mutations whose name contains "crf"
    python tools/mutation_check.py --patterns  # only check that every mutation still applies
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_IGNORE_ANYWHERE = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.egg-info", ".venv", "*.pyc")
_TOP_LEVEL_ONLY = {"work_dirs", "data", "results"}  # datasets and outputs at the root; caee/data is code


def IGNORE(folder: str, names: list[str]) -> set[str]:
    """What the copy leaves out (``shutil.copytree``'s ``ignore``)."""
    ignored = set(_IGNORE_ANYWHERE(folder, names))
    if Path(folder) == REPO:
        ignored |= _TOP_LEVEL_ONLY & set(names)
    return ignored


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str                                  # what the bug is, in a few words
    file: str                                  # path relative to the repository root
    edits: tuple[tuple[str, str], ...]         # (old, new) replacements; each old must occur exactly once
    tests: tuple[str, ...]                     # test files (or node ids) expected to catch it


def m(name: str, file: str, old: str, new: str, *tests: str) -> Mutation:
    return Mutation(name, file, ((old, new),), tests)


# the test that catches a wiring mutation (one test function keeps the run short)
_W = "tests/test_stage_wiring.py::"
CGNET_LOSS = _W + "test_cgnet_loss_is_cls_plus_w_times_cse_with_the_configured_mask"
CGNET_SCHEDULE = _W + "test_cgnet_stage_logs_the_weighted_loss_of_the_configured_schedule"
CRF_CALLS = _W + "test_pseudo_label_crf_gets_every_setting_and_the_walk_scores"
CRF_REAL = _W + "test_real_crf_run_equals_a_call_written_out_by_hand"
DEEPLAB_CRF = _W + "test_deeplab_test_crf_gets_every_setting"
WALK = _W + "test_walk_settings_reach_the_walk_on_a_non_degenerate_affinitynet"
BETA = _W + "test_changing_beta_changes_the_stage_labels"
SHARD = _W + "test_shard_is_disjoint_complete_and_balanced"
_G = "tests/test_gradients.py::"
GRAD_CGNET = _G + "test_cgnet_erasing_term_trains_the_cgnet_through_its_mask_and_never_the_oc"
GRAD_AFF = _G + "test_each_affinity_loss_term_reaches_the_head_and_every_trained_backbone_block"
GRAD_DEEPLAB = _G + "test_deeplab_loss_reaches_head_weights_biases_and_the_backbone"
GRAD_GROUPS = _G + "test_one_engine_step_gives_each_group_psa_lr_and_decay"
_R = "tests/test_randomness.py::"
RAND_CGNET = _R + "test_cgnet_run_draws_new_targets_crops_and_order_per_step_and_epoch"
RAND_AUG = _R + "test_train_augmentation_is_fresh_per_step_and_epoch_and_replays_exactly"
RAND_AFF = _R + "test_affinity_crop_flip_and_jitter_are_fresh_and_replay"
RAND_ORDER = _R + "test_sample_order_changes_every_epoch_and_replays"
RAND_RESUME = _R + "test_cgnet_run_resumed_from_last_pth_draws_exactly_what_an_uninterrupted_run_draws"
# IRN (caee/method/irn.py, models/irn.py, stages/train_irn.py, make_irn_labels.py; docs/METHOD.md §12)
IRN = "tests/test_irn.py"
_I = "tests/test_irn_stages.py::"
IRN_LABELS = _I + "test_train_irn_writes_relation_labels_of_the_configured_settings_and_trains"
IRN_WALK = _I + "test_make_irn_labels_equal_the_walk_by_hand_and_every_setting_matters"
IRN_STEP = _I + "test_irn_step_uses_the_training_radius_grid_and_loss"
IRN_DEFAULTS = _I + "test_irn_defaults_are_irn_run_sample_settings"
IRN_AUGMENT = _I + "test_irn_augmentation_rescales_by_the_factor_and_pads_the_crop"


def _irn_default(key: str, old: str, new: str) -> Mutation:
    """An IRN default that is no longer IRN's (run_sample.py / step/*.py)."""
    return m(f"irn.{key} default is not IRN's", "caee/core/config.py", old, new, IRN_DEFAULTS)


MUTATIONS: list[Mutation] = [
    # ---- class-specific erasing and the CGNet loss (stage 2)
    m("erase with mask instead of 1 - mask", "caee/method/erasing.py",
      "keep = 1.0 - mask", "keep = mask", "tests/test_erasing.py"),
    m("per-image mask normalisation uses the batch maximum", "caee/method/erasing.py",
      "peak = mask.amax(dim=(1, 2, 3), keepdim=True)", "peak = mask.amax()", "tests/test_erasing.py"),
    m("w schedule starts one epoch late", "caee/method/erasing.py",
      "return init + slope * epoch", "return init + slope * (epoch + 1)", "tests/test_erasing.py"),
    m("CSE target keeps the erased class", "caee/method/erasing.py",
      "remaining[has_target, targets[has_target]] = 0.0", "remaining[has_target, targets[has_target]] = 1.0",
      "tests/test_erasing.py"),
    m("CGNet loss drops the weight w", "caee/stages/train_cgnet.py",
      "return loss_cls + w * loss_cse, metrics", "return loss_cls + loss_cse, metrics", CGNET_LOSS,
      CGNET_SCHEDULE),
    m("configured mask normalisation not passed to erasing_mask", "caee/stages/train_cgnet.py",
      "erasing_mask(maps, targets, tuple(images.shape[-2:]), self.masking.normalization)",
      "erasing_mask(maps, targets, tuple(images.shape[-2:]))", CGNET_LOSS),
    m("configured masking depth ignored (always the image)", "caee/stages/train_cgnet.py",
      "erased_logits(self.oc, images, mask, self.masking.depth)", "erased_logits(self.oc, images, mask, 0)",
      CGNET_LOSS),
    # ---- CAMs (stage 3)
    m("CAM flip pass not un-flipped", "caee/method/cam.py",
      "maps = torch.cat([maps[:b], maps[b:].flip(-1)])", "maps = torch.cat([maps[:b], maps[b:]])",
      "tests/test_cam.py"),
    m("CAM flip pass dropped from the sum", "caee/method/cam.py",
      "total += up[:b] + up[b:] if flip else up", "total += up[:b] + up[:b] if flip else up", "tests/test_cam.py"),
    m("CAM uses only the first scale", "caee/method/cam.py",
      "    for s in scales:\n", "    for s in scales[:1]:\n", "tests/test_cam.py"),
    # ---- dense CRF
    m("CRF Gaussian compat takes the bilateral value", "caee/method/crf.py",
      "compat=params.gaussian_compat)", "compat=params.bilateral_compat)", CRF_CALLS),
    m("CRF bilateral srgb takes the bilateral sxy", "caee/method/crf.py",
      "srgb=params.bilateral_srgb", "srgb=params.bilateral_sxy", CRF_CALLS),
    m("CRF iterations fixed at 10", "caee/method/crf.py",
      "q = crf.inference(int(params.iterations))", "q = crf.inference(10)", CRF_CALLS),
    m("CRF unary halved (-log p / 2)", "caee/method/crf.py",
      "unary = np.ascontiguousarray(-np.log(p)", "unary = np.ascontiguousarray(-0.5 * np.log(p)", CRF_CALLS,
      CRF_REAL),
    m("CRF background score (1 - max CAM)^(alpha / 2)", "caee/method/crf.py",
      "np.clip(cams.max(axis=0), 0.0, 1.0), alpha)", "np.clip(cams.max(axis=0), 0.0, 1.0), alpha / 2)",
      "tests/test_crf.py"),
    m("CRF call swaps the Gaussian sxy and compat of the config", "caee/method/crf.py",
      "sxy=params.gaussian_sxy, compat=params.gaussian_compat", "sxy=params.gaussian_compat, compat=params.gaussian_sxy",
      CRF_CALLS),
    m("DeepLab test CRF swaps the config's bilateral sxy and srgb", "caee/stages/train_deeplab.py",
      "crf = cfg.crf if tc.test_crf else None",
      "crf = dataclasses.replace(cfg.crf, bilateral_sxy=cfg.crf.bilateral_srgb, bilateral_srgb=cfg.crf.bilateral_sxy)"
      " if tc.test_crf else None", DEEPLAB_CRF),
    # ---- affinity labels and AffinityNet (stage 4)
    m("la/ha rule: la background wins over ha background", "caee/method/affinity.py",
      "out[ha_label == 0] = 0", "out[la_label == 0] = 0", "tests/test_affinity.py"),
    m("pair radius includes the circle (<=)", "caee/method/affinity.py",
      "if dy * dy + dx * dx < radius * radius:", "if dy * dy + dx * dx <= radius * radius:",
      "tests/test_affinity.py"),
    m("background pairs need not share a label", "caee/method/affinity.py",
      "bg_pos = same & (a == 0)", "bg_pos = a == 0", "tests/test_affinity.py"),
    m("affinity loss weights bg/fg/neg swapped", "caee/method/affinity.py",
      'loss = terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2',
      'loss = terms["bg"] / 2 + terms["fg"] / 4 + terms["neg"] / 4', "tests/test_affinity.py"),
    # ---- random walk and the pseudo-label stage (stage 5)
    m("random walk raises affinities to beta / 2", "caee/method/random_walk.py",
      "vals = aff2.reshape(-1).pow(beta)", "vals = aff2.reshape(-1).pow(beta / 2)", "tests/test_random_walk.py"),
    m("random walk one step short", "caee/method/random_walk.py",
      "for _ in range(steps >> squarings):", "for _ in range((steps >> squarings) - 1):",
      "tests/test_random_walk.py"),
    m("walk background score (1 - max CAM)^(alpha / 2)", "caee/method/random_walk.py",
      "bg = (1.0 - fg_max.clamp(0.0, 1.0)).pow(alpha)", "bg = (1.0 - fg_max.clamp(0.0, 1.0)).pow(alpha / 2)",
      "tests/test_random_walk.py", "tests/test_pseudo_labels.py"),
    m("pseudo-label stage ignores pseudo_labels.beta", "caee/stages/make_pseudo_labels.py",
      "beta=pc.beta", "beta=8.0", WALK, BETA),
    m("pseudo-label stage ignores pseudo_labels.alpha", "caee/stages/make_pseudo_labels.py",
      "alpha=pc.alpha", "alpha=16.0", WALK),
    m("pseudo-label stage ignores pseudo_labels.steps", "caee/stages/make_pseudo_labels.py",
      "steps=pc.steps", "steps=256", WALK),
    m("pseudo-label stage ignores pseudo_labels.radius", "caee/stages/make_pseudo_labels.py",
      "radius=pc.radius", "radius=5", WALK),
    m("shard gives every rank items[r:] (overlapping work)", "caee/core/distributed.py",
      "return items[r::w]", "return items[r:]", SHARD),
    # ---- DeepLab (stage 6), metrics and training schedule
    m("DeepLab loss averages over ignored pixels too", "caee/stages/train_deeplab.py",
      "valid = target != IGNORE\n", "valid = target >= 0\n", "tests/test_deeplab.py"),
    m("DeepLab ignore label 0 instead of 255", "caee/stages/train_deeplab.py",
      "IGNORE = 255\n", "IGNORE = 0\n", "tests/test_deeplab.py"),
    m("threshold tie rule flipped (max == t is foreground), float32 CAMs", "caee/core/metrics.py",
      'copy=False), side="left")', 'copy=False), side="right")', "tests/test_metrics.py"),
    m("threshold tie rule flipped (max == t is foreground), float16 lookup table", "caee/core/metrics.py",
      'every, side="left")', 'every, side="right")', "tests/test_metrics.py"),
    m("confusion matrix transposed (rows = prediction)", "caee/core/metrics.py",
      "minlength=n * n).reshape(n, n)", "minlength=n * n).reshape(n, n).T", "tests/test_metrics.py"),
    # ---- fidelity to the official procedures (docs/METHOD.md §4-§6)
    m("multi-scale CAMs resize the normalised tensor (not PIL bicubic on the uint8 image)", "caee/method/cam.py",
      '        if self.resize == "bilinear":', "        if True:", "tests/test_fidelity_cam.py"),
    m("CRF unary ignores crf.min_prob (floor 1e-8)", "caee/method/crf.py",
      "p = np.maximum(probs, params.min_prob)", "p = np.maximum(probs, 1e-8)", "tests/test_fidelity_cam.py"),
    m("PSA cell rule: la background wins over ha background", "caee/method/affinity_labels.py",
      "    out[ha_arg == 0] = 0\n", "    out[la_arg == 0] = 0\n", "tests/test_affinity_psa_labels.py"),
    m("PSA cell rule: crop-padding cells (no score) not ignored", "caee/method/affinity_labels.py",
      "    out[no_score] = IGNORE\n", "", "tests/test_affinity_psa_labels.py"),
    m("IoU divides by the ground-truth count only", "caee/core/metrics.py",
      "union = gt_count + pred_count - tp", "union = gt_count", "tests/test_metrics.py"),
    m("poly lr ignores the configured power", "caee/engine/trainer.py",
      "return (1.0 - t) ** cfg.poly_power", "return (1.0 - t) ** 0.9", CGNET_SCHEDULE),
    # ---- IRN: relation labels, paths, loss, walk (equivalence with IRN's procedures) and wiring
    m("IRN relation labels: background of the bg map alone is confident", "caee/method/irn.py",
      "out[(fg_conf == 0) & (bg_conf == 0)] = 0", "out[bg_conf == 0] = 0", IRN),
    m("IRN label unary spreads 1 - gt_prob over all labels", "caee/method/irn.py",
      "(1.0 - gt_prob) / (n_labels - 1)", "(1.0 - gt_prob) / n_labels", IRN),
    m("IRN relation labels: background score of the fg map is the bg threshold", "caee/method/irn.py",
      "hard_labels(cams, fg_thres)", "hard_labels(cams, bg_thres)", IRN),
    m("IRN path keeps cells at distance 1 from the line", "caee/method/irn.py",
      "if (dy * x - dx * y) ** 2 < length_sq]", "if (dy * x - dx * y) ** 2 <= length_sq]", IRN),
    m("IRN affinity from the mean boundary along the path", "caee/method/irn.py",
      "(1.0 - along.max(dim=0).values)", "(1.0 - along.mean(dim=0))", IRN),
    m("IRN / AffinityNet loss weights bg and fg pairs 1/2 instead of 1/4", "caee/method/affinity.py",
      'loss = terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2',
      'loss = terms["bg"] / 2 + terms["fg"] / 2 + terms["neg"] / 2', IRN),
    m("IRN walk scores not damped by 1 - boundary", "caee/method/irn.py",
      "x = cams.float() * (1.0 - edge)", "x = cams.float()", IRN),
    m("IRN walk takes exp_times steps instead of 2^exp_times", "caee/method/irn.py",
      "steps=1 << int(exp_times)", "steps=int(exp_times)", IRN),
    m("IRN walk ignores beta", "caee/method/irn.py",
      "trans = transition_matrix(aff, from_idx, to_idx, h * w, beta)",
      "trans = transition_matrix(aff, from_idx, to_idx, h * w, 8.0)", IRN),
    m("IRN walk over PSA's smaller pair set", "caee/method/irn.py",
      "from_idx, to_idx = pair_indices(h, w, radius, psa_border=False, device=edge.device)",
      "from_idx, to_idx = pair_indices(h, w, radius, psa_border=True, device=edge.device)", IRN),
    m("IRN labels: walk scores not divided by their maximum", "caee/method/irn.py",
      "up.new_full((1, hh, ww), bg_thres), up / peak", "up.new_full((1, hh, ww), bg_thres), up", IRN),
    m("IRN labels: upsampling with align_corners=True", "caee/method/irn.py",
      'scale_factor=stride, mode="bilinear", align_corners=False',
      'scale_factor=stride, mode="bilinear", align_corners=True', IRN),
    m("IRN CAMs on the grid: top-left pixel instead of the cell mean", "caee/method/irn.py",
      "return F.avg_pool2d(cams.float().unsqueeze(0), stride, stride, ceil_mode=True)[0]",
      "return cams.float()[:, ::stride, ::stride]", IRN),
    m("IRN labels on the grid: top-left pixel instead of the cell centre (PIL nearest)", "caee/method/irn.py",
      "    o = stride // 2\n", "    o = 0\n", IRN),
    m("IRN boundary map without the mirror", "caee/method/irn.py",
      "torch.sigmoid(logits[0] / 2 + logits[1].flip(-1) / 2)", "torch.sigmoid(logits[0])", IRN),
    m("IRN backbone trains", "caee/models/irn.py",
      "        backbone.requires_grad_(False)\n", "", IRN),
    m("IRN backbone BatchNorm in training mode", "caee/models/irn.py",
      "        self.backbone.eval()  # frozen", "        pass  # frozen", IRN),
    m("IRN boundary branch: GroupNorm with one group", "caee/models/irn.py",
      "self.norm = nn.GroupNorm(groups, channels)", "self.norm = nn.GroupNorm(1, channels)", IRN),
    m("IRN boundary branch: ReLU before the upsampling", "caee/models/irn.py",
      "        x = self.norm(self.conv(x))\n", "        x = F.relu(self.norm(self.conv(x)))\n", IRN),
    m("IRN ResNet50 strides layer4 (output stride 32)", "caee/models/resnet50.py",
      "        tv.layer4[0].conv2.stride = (1, 1)\n", "", IRN, "tests/test_backbones.py"),
    m("train_irn ignores irn.conf_fg_thres", "caee/stages/train_irn.py",
      "ir_labels(image, keys, cams, ic.conf_fg_thres, ic.conf_bg_thres,", "ir_labels(image, keys, cams, 0.30, ic.conf_bg_thres,",
      IRN_LABELS),
    m("train_irn ignores irn.conf_bg_thres", "caee/stages/train_irn.py",
      "ir_labels(image, keys, cams, ic.conf_fg_thres, ic.conf_bg_thres,", "ir_labels(image, keys, cams, ic.conf_fg_thres, 0.05,",
      IRN_LABELS),
    m("train_irn ignores irn.crf", "caee/stages/train_irn.py",
      "ic.conf_bg_thres, ic.crf, ic.crf_gt_prob))", "ic.conf_bg_thres, dataclasses.replace(ic.crf, bilateral_sxy=50.0, "
      "bilateral_srgb=5.0), ic.crf_gt_prob))", IRN_LABELS),
    m("train_irn ignores irn.crf_gt_prob", "caee/stages/train_irn.py",
      "ic.crf, ic.crf_gt_prob))", "ic.crf, 0.7))", IRN_LABELS),
    m("train_irn ignores irn.train_radius", "caee/stages/train_irn.py",
      "boundary_affinity(edge, self.ic.train_radius, psa_border=True)", "boundary_affinity(edge, 10, psa_border=True)",
      IRN_STEP),
    m("train_irn samples labels at irn.edge_stride 8", "caee/stages/train_irn.py",
      'reduce_labels(ctx.to_device(batch["mask"]), self.ic.edge_stride)', 'reduce_labels(ctx.to_device(batch["mask"]), 8)',
      IRN_STEP),
    m("train_irn ignores irn.scale_range", "caee/stages/train_irn.py",
      "steps.append(RandomRescale(*ic.scale_range))", "steps.append(RandomRescale(0.5, 1.5))", IRN_AUGMENT),
    m("train_irn ignores irn.crop_size", "caee/stages/train_irn.py",
      "v2.RandomCrop(ic.crop_size,", "v2.RandomCrop(512,", IRN_AUGMENT),
    m("make_irn_labels ignores irn.beta", "caee/stages/make_irn_labels.py",
      "semantic_walk(grid, edge, ic.beta, ic.exp_times, ic.radius)", "semantic_walk(grid, edge, 10.0, ic.exp_times, ic.radius)",
      IRN_WALK),
    m("make_irn_labels ignores irn.exp_times", "caee/stages/make_irn_labels.py",
      "semantic_walk(grid, edge, ic.beta, ic.exp_times, ic.radius)", "semantic_walk(grid, edge, ic.beta, 8, ic.radius)",
      IRN_WALK),
    m("make_irn_labels ignores irn.radius", "caee/stages/make_irn_labels.py",
      "semantic_walk(grid, edge, ic.beta, ic.exp_times, ic.radius)", "semantic_walk(grid, edge, ic.beta, ic.exp_times, 5)",
      IRN_WALK),
    m("make_irn_labels ignores irn.sem_seg_bg_thres", "caee/stages/make_irn_labels.py",
      "ic.sem_seg_bg_thres, stride)", "0.25, stride)", IRN_WALK),
    m("make_irn_labels pads to 512 whatever irn.crop_size", "caee/stages/make_irn_labels.py",
      "torch.from_numpy(image).to(device)), ic.crop_size, stride)", "torch.from_numpy(image).to(device)), 512, stride)",
      IRN_WALK),
    _irn_default("conf_fg_thres", "conf_fg_thres: float = 0.30", "conf_fg_thres: float = 0.35"),
    _irn_default("conf_bg_thres", "conf_bg_thres: float = 0.05", "conf_bg_thres: float = 0.10"),
    _irn_default("crop_size", "crop_size: int = 512            # official (IRN", "crop_size: int = 448            # official (IRN"),
    _irn_default("batch_size", "batch_size: int = 32            # official (IRN", "batch_size: int = 16            # official (IRN"),
    _irn_default("epochs", "epochs: int = 3                 # official (IRN", "epochs: int = 5                 # official (IRN"),
    _irn_default("lr", "lr: float = 0.1                 # official (IRN", "lr: float = 0.01                # official (IRN"),
    _irn_default("weight_decay", "weight_decay: float = 1e-4      # official (IRN",
                 "weight_decay: float = 5e-4      # official (IRN"),
    _irn_default("momentum", "momentum: float = 1e-4", "momentum: float = 0.9"),
    _irn_default("beta", "beta: float = 10                # official (IRN", "beta: float = 8                 # official (IRN"),
    _irn_default("exp_times", "exp_times: int = 8", "exp_times: int = 7"),
    _irn_default("radius", "radius: int = 5                 # official (IRN make_sem_seg_labels",
                 "radius: int = 10                # official (IRN make_sem_seg_labels"),
    _irn_default("sem_seg_bg_thres", "sem_seg_bg_thres: float = 0.25", "sem_seg_bg_thres: float = 0.15"),
    _irn_default("train_radius", "train_radius: int = 10", "train_radius: int = 5"),
    _irn_default("crf_gt_prob", "crf_gt_prob: float = 0.7", "crf_gt_prob: float = 0.5"),
    _irn_default("crf", "CrfConfig(bilateral_sxy=50, bilateral_srgb=5)", "CrfConfig()"),
    _irn_default("scale_range", "lambda: [0.5, 1.5])  # official (IRN", "lambda: [0.9, 1.1])  # official (IRN"),
    _irn_default("edge_channels", "edge_channels: int = 32", "edge_channels: int = 64"),
    # ---- the runner: a selected step must not run on an unselected, stale upstream step's outputs
    m("caee run --stages X runs on stale upstream outputs", "caee/pipeline/runner.py",
      "    refuse_stale(jobs, context, {job.name: upstream_of(job, context) for job in jobs})\n", "",
      "tests/test_runner.py"),
    m("a stale step is judged by its own record only (not through its inputs)", "caee/pipeline/runner.py",
      "            if not memo[job.key] and _stale(up, context, memo):", "            if False:", "tests/test_runner.py"),
    # ---- records: one per output, written by its stage, read by the pipeline
    m("stages record no input ids", "caee/stages/common.py",
      'settings[f"input.{input_name}"] = _input_id(Path(path), key)', "pass", "tests/test_safety.py"),
    m("a path setting naming another output is not an input", "caee/stages/common.py",
      'settings[f"input.{key}"] = _input_id(path, key)', "pass", "tests/test_runner.py"),
    m("records keep absolute paths inside the work_dir", "caee/core/records.py",
      "out[prefix] = list(data) if isinstance(data, tuple) else _relative(data, work_dir)",
      "out[prefix] = list(data) if isinstance(data, tuple) else data", "tests/test_runner.py"),
    m("a refused re-run removes the old outputs first", "caee/stages/common.py",
      "    if made and not overwrite:\n        raise records.refusal(folder, diffs, f\"{table.stage(name).section}.overwrite\")\n",
      "", "tests/test_safety.py"),
    m("stage ignores net.output_stride (the backbone keeps its own stride)", "caee/models/__init__.py",
      '        kwargs["output_stride"] = stride\n', "", "tests/test_key_wiring.py", "tests/test_backbones.py"),
    m("stage ignores <trainer>.overwrite (a trainer's folder is never started over)", "caee/stages/common.py",
      "overwrite = getattr(cfg, table.stage(stage).section).overwrite", "overwrite = False",
      "tests/test_runner.py::test_a_stage_run_alone_with_overwrite_makes_the_pipeline_redo_it_and_what_follows"),
    m("the results table measures with the unexpanded config ({work_dir}/... folders not found)",
      "caee/pipeline/results.py", "    cfg = expand_work_dir(cfg)  # a folder given as {work_dir}/... is found\n", "",
      "tests/test_layout.py::test_the_results_table_finds_folders_given_with_work_dir"),
    m("the pipeline ignores the records' complete parts", "caee/core/records.py",
      'return [] if part in record["complete"] else', 'return [] if True else', "tests/test_runner.py", "tests/test_pipeline.py"),
    m("the pipeline steps ignore pseudo_labels.method", "caee/stages/table.py",
      "and (not s.generator or s.generator == pl.method or pl.compare)]", "]", "tests/test_irn_stages.py"),
    m("image-label cache derived from other masks is reused", "caee/data/splits.py",
      'if source and recorded.startswith("masks:") and recorded != source:', "if False:", "tests/test_data.py"),
    # ---- SGD inside backward (train_*.step_in_backward)
    m("the engine ignores train_*.step_in_backward", "caee/engine/trainer.py",
      "    if cfg.step_in_backward:\n        step_in_backward(optimizer)\n", "", "tests/test_engine.py"),
    m("step_in_backward drops the weight decay", "caee/engine/sgd_in_backward.py",
      '            d = d.add(p, alpha=group["weight_decay"])\n', "            pass\n", "tests/test_engine.py"),
    m("step_in_backward keeps the group of its start (stale lr after a resume)", "caee/engine/sgd_in_backward.py",
      "lambda p, gi=gi: _update(p, optimizer.param_groups[gi], optimizer.state[p])",
      "lambda p, gi=gi, g=group: _update(p, g, optimizer.state[p])", "tests/test_engine.py"),
    # ---- the synthetic data's design (docs/METHOD.md §10)
    m("stripe fade runs backwards (plain centre, full rim)", "caee/data/synthetic.py",
      "stripes * (1.0 - cfg.stripe_fade * np.clip(rho, 0.0, 1.0))",
      "stripes * (1.0 - cfg.stripe_fade * (1.0 - np.clip(rho, 0.0, 1.0)))",
      "tests/test_synthetic.py::test_stripe_fade_weakens_the_stripes_towards_the_outline_only"),
    # ---- where the gradients of the real tasks go (tests/test_gradients.py): every loss value unchanged
    m("CGNet erasing mask built from detached maps (L_cse never trains the CGNet)", "caee/stages/train_cgnet.py",
      "erasing_mask(maps, targets,", "erasing_mask(maps.detach(), targets,", GRAD_CGNET),
    m("erasing mask detached inside erasing_mask", "caee/method/erasing.py",
      "target_maps = maps[torch.arange(b, device=maps.device), idx].unsqueeze(1)",
      "target_maps = maps.detach()[torch.arange(b, device=maps.device), idx].unsqueeze(1)", GRAD_CGNET),
    m("the frozen OC still asks for gradients", "caee/stages/train_cgnet.py",
      "        p.requires_grad_(False)\n", "        pass\n", GRAD_CGNET),
    m("the frozen OC left in training mode (BatchNorm statistics move)", "caee/stages/train_cgnet.py",
      "    module.eval()\n", "    module.train()\n", GRAD_CGNET),
    m("AffinityNet's deepest input feature detached (last backbone blocks untrained)", "caee/models/affinitynet.py",
      "F.elu(self.f8_5(c6))", "F.elu(self.f8_5(c6.detach()))", GRAD_AFF),
    m("DeepLab head reads detached backbone features", "caee/models/deeplab.py",
      "return self.head(self.backbone(x))", "return self.head(self.backbone(x).detach())", GRAD_DEEPLAB),
    # ---- each parameter group's effective lr and decay after a real step (PSA: 1x, 2x no decay, 10x, 20x no decay)
    m("head biases at 10x (bias multiplier not applied to new layers)", "caee/engine/trainer.py",
      '"hb": (cfg.head_lr_mult * cfg.bias_lr_mult, 0.0)', '"hb": (cfg.head_lr_mult, 0.0)', GRAD_GROUPS),
    m("head biases get weight decay", "caee/engine/trainer.py",
      '"hb": (cfg.head_lr_mult * cfg.bias_lr_mult, 0.0)', '"hb": (cfg.head_lr_mult * cfg.bias_lr_mult, cfg.weight_decay)',
      GRAD_GROUPS),
    m("backbone biases get weight decay", "caee/engine/trainer.py",
      '"b": (cfg.bias_lr_mult, 0.0)', '"b": (cfg.bias_lr_mult, cfg.weight_decay)', GRAD_GROUPS),
    m("the loop ignores the group multipliers (every group at the base lr)", "caee/engine/trainer.py",
      'g["lr"] = cfg.lr * g["lr_mult"] * factor', 'g["lr"] = cfg.lr * factor', GRAD_GROUPS),
    m("classifier task names no new layers (fc8 at 1x)", "caee/stages/train_classifier.py",
      "        return [self.model.fc8]\n", "        return []\n", GRAD_GROUPS),
    m("AffinityNet's f9 not a new layer (1x)", "caee/models/affinitynet.py",
      "return [self.f8_3, self.f8_4, self.f8_5, self.f9]", "return [self.f8_3, self.f8_4, self.f8_5]", GRAD_GROUPS),
    m("DeepLab's LargeFOV fc6 / fc7 trained as backbone (only fc8 new)", "caee/models/deeplab.py",
      "        return [self.head]\n", "        return [getattr(self.head, 'fc8', self.head)]\n", GRAD_GROUPS),
    # ---- randomness fresh per step and epoch, replayed on resume (tests/test_randomness.py)
    m("per-step generator seeded by the epoch (same erasing targets all epoch)", "caee/engine/trainer.py",
      "_mix(self.seed, 7919, self.step)", "_mix(self.seed, 7919, self.epoch)", RAND_CGNET),
    m("CGNet erasing targets from a fixed generator", "caee/stages/train_cgnet.py",
      "targets = sample_targets(labels, ctx.generator())",
      "targets = sample_targets(labels, torch.Generator().manual_seed(0))", RAND_CGNET),
    m("sample augmentation ignores the epoch (the same crops every epoch)", "caee/engine/trainer.py",
      "s = _mix(self.seed, epoch, i)", "s = _mix(self.seed, 0, i)", RAND_AUG),
    m("sample augmentation ignores the index (one crop for a whole epoch)", "caee/engine/trainer.py",
      "s = _mix(self.seed, epoch, i)", "s = _mix(self.seed, epoch, 0)", RAND_AUG),
    m("torch seeded with the run seed per sample (every draw the same)", "caee/engine/trainer.py",
      "        torch.manual_seed(s)\n", "        torch.manual_seed(self.seed)\n", RAND_AUG),
    m("sample order the same every epoch", "caee/engine/trainer.py",
      "_mix(self.seed, 104729, self.epoch)", "_mix(self.seed, 104729, 0)", RAND_ORDER),
    m("long-side resize from a fixed generator", "caee/data/transforms.py",
      "long_side = int(torch.randint(self.low, self.high + 1, ()).item())",
      "long_side = int(torch.randint(self.low, self.high + 1, (), generator=torch.Generator().manual_seed(0)).item())",
      RAND_AUG),
    m("AffinityNet crop box from a fixed generator", "caee/data/transforms.py",
      "box = random_crop_box(height, width, self.crop_size)",
      "box = random_crop_box(height, width, self.crop_size, torch.Generator().manual_seed(0))", RAND_AFF),
    m("AffinityNet crops always flipped", "caee/data/transforms.py",
      "flip = self.hflip and bool(torch.rand(()) < 0.5)", "flip = self.hflip", RAND_AFF),
    m("a resumed epoch restarts its sample order at batch 0", "caee/engine/trainer.py",
      "cfg.seed, epoch, start_batch)", "cfg.seed, epoch, 0)", RAND_RESUME),
]

# ---- "stage ignores <key>": one generated mutation per key of tests/test_key_wiring.py's table:
# where the stage reads the key, the default (or a constant) is used instead
_MC, _LAYOUT = "caee/stages/make_cam.py", "caee/core/layout.py"
KEY_READS: dict[str, tuple[str, str, str]] = {  # key: (file, the read, the read replaced)
    "cam.scales": (_MC, "keys, cc.scales, cc.flip, device, cc.amp,", "keys, [0.5, 1.0, 1.5, 2.0], cc.flip, device, cc.amp,"),
    "cam.flip": (_MC, "keys, cc.scales, cc.flip, device, cc.amp,", "keys, cc.scales, True, device, cc.amp,"),
    "cam.amp": (_MC, "keys, cc.scales, cc.flip, device, cc.amp,", "keys, cc.scales, cc.flip, device, True,"),
    "cam.resize": (_MC, "cc.resize)", '"pil_bicubic")'),
    "cam.dtype": (_MC, "c.astype(cc.dtype)", 'c.astype("float16")'),
    "cam.batch_size": (_MC, "batch_size=cc.batch_size", "batch_size=1"),
    "cam.split": (_MC, "split = cc.split or cfg.data.cam_split", "split = cfg.data.cam_split"),
    "cam.pictures": (_MC, "range(min(cc.pictures, len(index)))", "range(min(0, len(index)))"),
    "cam.crf_alphas": (_MC, "list(cc.crf_alphas), cfg.crf", "[], cfg.crf"),
    # (the per-file skip `if cc.overwrite or not ...` cannot matter: open_output has removed the files)
    "cam.overwrite": (_MC, 'stage_settings(cfg, "make_cam"), cfg.cam.overwrite, "*.npz")',
                      'stage_settings(cfg, "make_cam"), False, "*.npz")'),
    # the lead's layout.py: update these patterns when it is rewritten
    "cam.source": (_LAYOUT, 'default = self.model(f"train_{source}")', 'default = self.model("train_cgnet")'),
    "cam.weights": (_LAYOUT, 'self.at("cam.weights", default)', "default"),
    "cam.out_dir": (_LAYOUT, 'self.at("cam.out_dir", default)', "default"),
}
_K = "tests/test_key_wiring.py::"
MUTATIONS += [m(f"stage ignores {key}", file, old, new, _K + "test_every_cam_key_reaches_make_cam_s_consumer",
                _K + "test_cam_weights_and_out_dir_reach_make_cam") for key, (file, old, new) in KEY_READS.items()]
_MPL = "caee/stages/make_pseudo_labels.py"
PSEUDO_KEY_READS: dict[str, tuple[str, str, str]] = {  # the walk settings: "pseudo-label stage ignores ..." above
    "pseudo_labels.psa_border": (_MPL, "psa_border=pc.psa_border)", "psa_border=False)"),
    "pseudo_labels.psa_border (pair set)": (_MPL, "PairCache(params.radius, params.psa_border)",
                                            "PairCache(params.radius, False)"),
    "pseudo_labels.split": (_MPL, "split = pc.split or cfg.data.cam_split", "split = cfg.data.cam_split"),
    # (the per-file skip `if pc.overwrite or not ...` cannot matter: the stage's start has removed the files)
    "pseudo_labels.overwrite": (_MPL, 'start_label_stage(cfg, "make_pseudo_labels", out_dir, pc.overwrite)',
                                'start_label_stage(cfg, "make_pseudo_labels", out_dir, False)'),
    "pseudo_labels.crf": (_MPL, "crf = cfg.crf if pc.crf else None", "crf = None"),
}
MUTATIONS += [m(f"stage ignores {key}", file, old, new,
                _K + "test_every_pseudo_labels_key_reaches_the_walk_or_the_files")
              for key, (file, old, new) in PSEUDO_KEY_READS.items()]
# ---- the trainer sections (tests/test_key_wiring.py, one run per trainer with every key changed): the
# engine's reads (caee/engine/trainer.py) are caught by any trainer's run; a stage's own reads by its run
_T = _K + "test_every_trainer_key_reaches_the_engine_and_the_stage_s_consumers[{}]"
_ADAM, _SGD = _T.format("train_affinity"), _T.format("train_deeplab")   # the cheapest run of each variant
_AFF_PSA = _K + "test_affinity_psa_rule_augments_with_the_section_s_crop_flip_and_jitter"
_TR, _TF, _TC = "caee/engine/trainer.py", "caee/data/transforms.py", "caee/stages/train_cgnet.py"
_TA, _TD, _TI = "caee/stages/train_affinity.py", "caee/stages/train_deeplab.py", "caee/stages/train_irn.py"
TRAIN_KEY_READS: dict[str, tuple[str, str, str, str]] = {  # key: (file, the read, the read replaced, test)
    "<trainer>.batch_size": (_TR, "batch_size=cfg.batch_size // world", "batch_size=16 // world", _ADAM),
    "<trainer>.epochs": (_TR, "total = cfg.epochs * steps_per_epoch", "total = 15 * steps_per_epoch", _ADAM),
    "<trainer>.max_steps": (_TR, "stop_at = min(total, cfg.max_steps) if cfg.max_steps > 0 else total",
                            "stop_at = total", _ADAM),
    "<trainer>.optimizer": (_TR, 'if cfg.optimizer == "adam":', "if False:", _ADAM),
    "<trainer>.schedule": (_TR, 'if cfg.schedule == "poly":', "if True:", _ADAM),
    "<trainer>.lr": (_TR, 'g["lr"] = cfg.lr * g["lr_mult"] * factor', 'g["lr"] = 0.01 * g["lr_mult"] * factor', _ADAM),
    "<trainer>.momentum": (_TR, "momentum=cfg.momentum", "momentum=0.9", _SGD),
    "<trainer>.weight_decay": (_TR, '"w": (1.0, cfg.weight_decay)', '"w": (1.0, 5e-4)', _ADAM),
    "<trainer>.poly_power": (_TR, "** cfg.poly_power", "** 0.9", _SGD),
    "<trainer>.head_lr_mult": (_TR, '"hw": (cfg.head_lr_mult, cfg.weight_decay)', '"hw": (10.0, cfg.weight_decay)',
                               _ADAM),
    "<trainer>.bias_lr_mult": (_TR, '"b": (cfg.bias_lr_mult, 0.0)', '"b": (2.0, 0.0)', _SGD),
    "<trainer>.seed": (_TR, "EpochSampler(len(dataset), cfg.batch_size, cfg.seed, epoch, start_batch)",
                       "EpochSampler(len(dataset), cfg.batch_size, 0, epoch, start_batch)", _ADAM),
    "<trainer>.checkpoint_every": (_TR, "step % cfg.checkpoint_every == 0", "step % 500 == 0", _ADAM),
    "<trainer>.log_every": (_TR, "step % cfg.log_every == 0", "step % 20 == 0", _ADAM),
    "<trainer>.step_in_backward": (_TR, "if cfg.step_in_backward:", "if False:", _SGD),
    "<trainer>.keep_epochs": ("caee/engine/monitor.py", "if not (self.keep_epochs and self.enabled):",
                              "if not (False and self.enabled):", _ADAM),
    "<trainer>.net.pretrained": ("caee/models/__init__.py", "if net_cfg.pretrained:", "if False:", _ADAM),
    "<trainer>.crop_size": (_TF, "steps.append(v2.RandomCrop(train_cfg.crop_size,", "steps.append(v2.RandomCrop(448,",
                            _T.format("train_classifier")),
    "<trainer>.resize_long": (_TF, "steps.append(RandomLongSideResize(*train_cfg.resize_long))",
                              "steps.append(RandomLongSideResize(256, 512))", _ADAM),
    "<trainer>.hflip": (_TF, "    if train_cfg.hflip:\n", "    if True:\n", _ADAM),
    "<trainer>.color_jitter": (_TF, "jitter = list(train_cfg.color_jitter)", "jitter = [0.3, 0.3, 0.3, 0.1]", _ADAM),
    "train_classifier.net.dropout": ("caee/models/classifier.py", "num_classes, dropout=net.dropout)",
                                     "num_classes, dropout=0.5)", _T.format("train_classifier")),
    "train_classifier.init": ("caee/stages/train_classifier.py", "    if tc.init:\n        load_model_weights(model,",
                              "    if False:\n        load_model_weights(model,", _T.format("train_classifier")),
    "train_classifier.num_workers (data.num_workers)": (
        "caee/stages/train_classifier.py", "config_to_dict(cfg), cfg.data.num_workers,", "config_to_dict(cfg), 2,",
        _T.format("train_classifier")),
    "train_cgnet.init": (_TC, "    if tc.init:\n        load_model_weights(cgnet,",
                         "    if False:\n        load_model_weights(cgnet,", _T.format("train_cgnet")),
    "train_cgnet.select_by_oracle": (_TC, "if tc.select_by_oracle else None", "if False else None",
                                     _T.format("train_cgnet")),
    "data.cam_split (the CGNet's oracle)": (_TC, "load_split(cfg.data, cfg.data.cam_split), env.device)",
                                            'load_split(cfg.data, "train"), env.device)', _T.format("train_cgnet")),
    "masking.depth": (_TC, "erased_logits(self.oc, images, mask, self.masking.depth)",
                      "erased_logits(self.oc, images, mask, 0)", _T.format("train_cgnet")),
    "masking.normalization": (_TC, "tuple(images.shape[-2:]), self.masking.normalization)",
                              'tuple(images.shape[-2:]), "batch")', _T.format("train_cgnet")),
    "masking.cse_init": (_TC, "cse_weight(ctx.epoch, self.masking.cse_init, self.masking.cse_slope)",
                         "cse_weight(ctx.epoch, 0.3, self.masking.cse_slope)", _T.format("train_cgnet")),
    "masking.cse_slope": (_TC, "cse_weight(ctx.epoch, self.masking.cse_init, self.masking.cse_slope)",
                          "cse_weight(ctx.epoch, self.masking.cse_init, 0.05)", _T.format("train_cgnet")),
    "train_affinity.label_rule": (_TA, '    if tc.label_rule == "psa":\n        table_dir',
                                  '    if True:\n        table_dir', _ADAM),
    "train_affinity.la_alpha": (_TA, "for a in (tc.la_alpha, tc.ha_alpha)}", "for a in (4.0, tc.ha_alpha)}", _ADAM),
    "train_affinity.ha_alpha": (_TA, "for a in (tc.la_alpha, tc.ha_alpha)}", "for a in (tc.la_alpha, 24.0)}", _ADAM),
    "train_affinity.radius": (_TA, "offset_affinity(feats.float(), self.cfg.radius, self.cfg.psa_border)",
                              "offset_affinity(feats.float(), 5, self.cfg.psa_border)", _ADAM),
    "train_affinity.psa_border": (_TA, "offset_affinity(feats.float(), self.cfg.radius, self.cfg.psa_border)",
                                  "offset_affinity(feats.float(), self.cfg.radius, True)", _ADAM),
    "train_affinity.head_channels": (_TA, "build_affinitynet(net, tc.head_channels, tc.embed_stride)",
                                     "build_affinitynet(net, [64, 128, 256], tc.embed_stride)", _ADAM),
    "train_affinity.embed_stride": (_TA, "build_affinitynet(net, tc.head_channels, tc.embed_stride)",
                                    "build_affinitynet(net, tc.head_channels, 0)", _ADAM),
    "train_affinity.crop_size (label_rule psa)": (_TA, "AffinityAugment(tc.crop_size, tc.hflip, tc.color_jitter)",
                                 "AffinityAugment(448, tc.hflip, tc.color_jitter)", _AFF_PSA),
    "train_affinity.hflip (label_rule psa)": (_TA, "AffinityAugment(tc.crop_size, tc.hflip, tc.color_jitter)",
                                              "AffinityAugment(tc.crop_size, True, tc.color_jitter)", _AFF_PSA),
    "train_affinity.color_jitter (label_rule psa)": (_TA, "AffinityAugment(tc.crop_size, tc.hflip, tc.color_jitter)",
                                                     "AffinityAugment(tc.crop_size, tc.hflip, [0.3, 0.3, 0.3, 0.1])",
                                                     _AFF_PSA),
    "train_deeplab.head": (_TD, "len(names) + 1, tc.head, tc.head_channels,", 'len(names) + 1, "largefov", tc.head_channels,',
                           _SGD),
    "train_deeplab.head_channels": (_TD, "tc.head, tc.head_channels, tc.head_dilations, tc.head_dropout)",
                                    "tc.head, 0, tc.head_dilations, tc.head_dropout)", _SGD),
    "train_deeplab.head_dilations": (_TD, "tc.head, tc.head_channels, tc.head_dilations, tc.head_dropout)",
                                     "tc.head, tc.head_channels, [], tc.head_dropout)", _SGD),
    "train_deeplab.head_dropout": (_TD, "tc.head, tc.head_channels, tc.head_dilations, tc.head_dropout)",
                                   "tc.head, tc.head_channels, tc.head_dilations, 0.5)", _SGD),
    "train_deeplab.split": (_TD, "split = tc.split or cfg.pseudo_labels.split or cfg.data.cam_split",
                            "split = cfg.pseudo_labels.split or cfg.data.cam_split", _SGD),
    "train_deeplab.eval_split": (_TD, "eval_index = load_split(cfg.data, tc.eval_split or cfg.data.val_split)",
                                 "eval_index = load_split(cfg.data, cfg.data.val_split)", _SGD),
    "train_deeplab.test_scales": (_TD, "segment.TestSettings(list(tc.test_scales), tc.test_flip,",
                                  "segment.TestSettings([1.0], tc.test_flip,", _SGD),
    "train_deeplab.test_flip": (_TD, "segment.TestSettings(list(tc.test_scales), tc.test_flip,",
                                "segment.TestSettings(list(tc.test_scales), False,", _SGD),
    "train_deeplab.test_crf": (_TD, "crf = cfg.crf if tc.test_crf else None", "crf = None", _SGD),
    "train_deeplab.init": (_TD, "    if tc.init:\n        init_weights_from(model,",
                           "    if False:\n        init_weights_from(model,", _SGD),
    "train_deeplab.eval_only": (_TD, "    if tc.eval_only:\n        return evaluate_only(cfg)",
                                "    if False:\n        return evaluate_only(cfg)",
                                _K + "test_deeplab_eval_only_and_weights_reach_the_evaluation"),
    "data.val_split (DeepLab's evaluation)": (
        _TD, "    index = load_split(cfg.data, tc.eval_split or cfg.data.val_split)\n    info = {",
        '    index = load_split(cfg.data, tc.eval_split or "val")\n    info = {',
        _K + "test_deeplab_eval_only_and_weights_reach_the_evaluation"),
    "irn.scale_range": (_TI, "steps.append(RandomRescale(*ic.scale_range))", "steps.append(RandomRescale(0.5, 1.5))",
                        _T.format("irn")),
    "irn.hflip": (_TI, "    if ic.hflip:\n", "    if True:\n", _T.format("irn")),
    "irn.crop_size": (_TI, "v2.RandomCrop(ic.crop_size, pad_if_needed=True,", "v2.RandomCrop(512, pad_if_needed=True,",
                      _T.format("irn")),
    "irn.conf_fg_thres": (_TI, "ir_labels(image, keys, cams, ic.conf_fg_thres, ic.conf_bg_thres, ic.crf, ic.crf_gt_prob)",
                          "ir_labels(image, keys, cams, 0.30, ic.conf_bg_thres, ic.crf, ic.crf_gt_prob)", _T.format("irn")),
    "irn.conf_bg_thres": (_TI, "ir_labels(image, keys, cams, ic.conf_fg_thres, ic.conf_bg_thres, ic.crf, ic.crf_gt_prob)",
                          "ir_labels(image, keys, cams, ic.conf_fg_thres, 0.05, ic.crf, ic.crf_gt_prob)", _T.format("irn")),
    "irn.crf_gt_prob": (_TI, "ir_labels(image, keys, cams, ic.conf_fg_thres, ic.conf_bg_thres, ic.crf, ic.crf_gt_prob)",
                        "ir_labels(image, keys, cams, ic.conf_fg_thres, ic.conf_bg_thres, ic.crf, 0.7)", _T.format("irn")),
    "irn.train_radius": (_TI, "boundary_affinity(edge, self.ic.train_radius, psa_border=True)",
                         "boundary_affinity(edge, 10, psa_border=True)", _T.format("irn")),
    "irn.edge_stride": (_TI, 'reduce_labels(ctx.to_device(batch["mask"]), self.ic.edge_stride)',
                        'reduce_labels(ctx.to_device(batch["mask"]), 4)', _T.format("irn")),
    "irn.edge_channels": (_TI, "build_irn(net, ic.edge_channels, ic.edge_groups, ic.edge_stride)",
                          "build_irn(net, 32, ic.edge_groups, ic.edge_stride)", _T.format("irn")),
    "irn.edge_groups": (_TI, "build_irn(net, ic.edge_channels, ic.edge_groups, ic.edge_stride)",
                        "build_irn(net, ic.edge_channels, 4, ic.edge_stride)", _T.format("irn")),
    "irn.init": (_TI, "    if ic.init:\n        how = init_weights_from(", "    if False:\n        how = init_weights_from(",
                 _T.format("irn")),
}
_CRF, _SC = "caee/method/crf.py", "caee/engine/scoring.py"
_PSEUDO = _K + "test_every_pseudo_labels_key_reaches_the_walk_or_the_files"
_EVAL = _K + "test_every_eval_key_reaches_the_scoring"
_DATA = _K + "test_every_data_key_reaches_the_index"
TRAIN_KEY_READS.update({
    "crf.iterations": (_CRF, "crf.inference(int(params.iterations))", "crf.inference(10)", _PSEUDO),
    "crf.gaussian_sxy": (_CRF, "addPairwiseGaussian(sxy=params.gaussian_sxy,", "addPairwiseGaussian(sxy=3,", _PSEUDO),
    "crf.gaussian_compat": (_CRF, "compat=params.gaussian_compat)", "compat=3)", _PSEUDO),
    "crf.bilateral_sxy": (_CRF, "addPairwiseBilateral(sxy=params.bilateral_sxy,", "addPairwiseBilateral(sxy=80,", _PSEUDO),
    "crf.bilateral_srgb": (_CRF, "srgb=params.bilateral_srgb,", "srgb=13,", _PSEUDO),
    "crf.bilateral_compat": (_CRF, "compat=params.bilateral_compat)", "compat=10)", _PSEUDO),
    "crf.min_prob": (_CRF, "p = np.maximum(probs, params.min_prob)", "p = np.maximum(probs, 1e-5)", _PSEUDO),
    "crf.workers": (_MPL, "workers_for(cfg.crf.workers) if crf else 1", "workers_for(0) if crf else 1", _PSEUDO),
    "eval.kind": ("caee/stages/eval_miou.py", "evaluate_dir(folder, index, cfg.eval, cfg.eval.kind)",
                  "evaluate_dir(folder, index, cfg.eval)", _EVAL),
    "eval.thresholds": (_SC, "evaluate_cam_dir(folder, index, eval_cfg.thresholds, eval_cfg.threshold, workers,",
                        "evaluate_cam_dir(folder, index, [0.25], eval_cfg.threshold, workers,", _EVAL),
    "eval.threshold": (_SC, "evaluate_cam_dir(folder, index, eval_cfg.thresholds, eval_cfg.threshold, workers,",
                       "evaluate_cam_dir(folder, index, eval_cfg.thresholds, 0.25, workers,", _EVAL),
    "eval.allow_missing": (_SC, "                                eval_cfg.allow_missing)\n",
                           "                                False)\n", _EVAL),
    "eval.workers": (_SC, "workers = eval_cfg.workers or None", "workers = None", _EVAL),
    "eval.dir": (_LAYOUT, 'return self.at("eval.dir", self.cam_dir())', "return self.cam_dir()", _EVAL),
    "eval.split": (_LAYOUT, "return self.cfg.eval.split or self.cfg.data.cam_split", "return self.cfg.data.cam_split",
                   _EVAL),
    "eval.out": (_LAYOUT, 'return self.at("eval.out", self.eval_file(', "return (lambda k, d: d)(\"eval.out\", self.eval_file(",
                 _EVAL),
    # path keys of the trainers: the stage takes the default path instead of its row's input
    "train_cgnet.oc_weights": ("caee/stages/train_cgnet.py", 'oc_path = table.stage("train_cgnet").input(cfg, "oc")',
                               'oc_path = Path(cfg.work_dir) / "train_classifier" / "model.pth"', _T.format("train_cgnet")),
    "train_affinity.cam_dir": ("caee/stages/train_affinity.py", 'cam_dir = table.stage("train_affinity").input(cfg, "cams")',
                               'cam_dir = Path(cfg.work_dir) / "cam_cgnet"', _ADAM),
    "train_deeplab.label_dir": ("caee/stages/train_deeplab.py", 'label_dir = table.stage(STAGE).input(cfg, "labels")',
                                'label_dir = Path(cfg.work_dir) / "pseudo_labels"', _SGD),
    "train_deeplab.weights": ("caee/stages/train_deeplab.py",
                              "weights = Path(tc.weights) if tc.weights else Layout(cfg).model(STAGE)",
                              "weights = Layout(cfg).model(STAGE)",
                              _K + "test_deeplab_eval_only_and_weights_reach_the_evaluation"),
    "irn.cam_dir": ("caee/stages/train_irn.py", 'cam_dir = table.stage(STAGE).input(cfg, "cams")',
                    'cam_dir = Path(cfg.work_dir) / "cam_cgnet"', _T.format("irn")),
    "data.train_split": ("caee/stages/common.py", "load_split(cfg.data, cfg.data.train_split)", 'load_split(cfg.data, "train")',
                         _T.format("train_classifier")),
    "data.image_dir": ("caee/data/splits.py", "dirs = [root / data_cfg.image_dir]", 'dirs = [root / "JPEGImages"]', _DATA),
    "data.mask_dir": ("caee/data/splits.py", "mask_dir = _existing_dir(root / data_cfg.mask_dir) if data_cfg.mask_dir",
                      'mask_dir = _existing_dir(root / "SegmentationClassAug") if data_cfg.mask_dir', _DATA),
    "data.eval_mask_dir": ("caee/data/splits.py",
                           "eval_dir = _existing_dir(root / data_cfg.eval_mask_dir) if data_cfg.eval_mask_dir",
                           'eval_dir = _existing_dir(root / "SegmentationClass") if data_cfg.eval_mask_dir', _DATA),
    "data.labels_csv": ("caee/data/splits.py", "    path = Path(data_cfg.labels_csv)\n",
                        '    path = Path("labels.csv.missing")\n', _DATA),
    "data.dataset": ("caee/data/splits.py", 'if data_cfg.labels_csv or data_cfg.dataset == "custom":',
                     "if False:", _DATA),
    "data.root": ("caee/data/splits.py", "    root = Path(data_cfg.root)\n    if not root.is_dir():",
                  '    root = Path("data/synthetic")\n    if not root.is_dir():', _DATA),
})
MUTATIONS += [m(f"stage ignores {key}", file, old, new, test) for key, (file, old, new, test) in TRAIN_KEY_READS.items()]


def _synthetic_reads() -> list[Mutation]:
    """data.synthetic: for every key, the first line of caee/data/synthetic.py that uses ``cfg.<key>``
    (occurring once, not a range check) with the key's default in its place (part_size: where the
    emblem is painted, the last such line); tests/test_key_wiring.py draws or generates with each key
    changed."""
    import re

    from caee.core.config import SyntheticConfig

    path = "caee/data/synthetic.py"
    text = (REPO / path).read_text()
    which = {"part_size": -1}
    out = []
    for f in dataclasses.fields(SyntheticConfig):
        default = getattr(SyntheticConfig(), f.name)
        read = re.compile(rf"(?<![\w.])cfg\.{f.name}\b")
        lines = [line for line in text.splitlines(keepends=True) if read.search(line) and text.count(line) == 1
                 and not line.strip().startswith(("if ", "raise "))]   # not the range checks: a use
        old, new = (lines[which.get(f.name, 0)], read.sub(repr(default), lines[which.get(f.name, 0)])) if lines \
            else (f"cfg.{f.name} <no line uses it once>", "")
        out.append(m(f"stage ignores data.synthetic.{f.name}", path, old, new,
                     _K + "test_every_synthetic_key_changes_the_images"))
    return out


MUTATIONS += _synthetic_reads()

MUTATIONS += [
    m("AffinityNet reads the CAMs of cam.source (not the CGNet's)", "caee/stages/table.py",
      '("train_affinity.cam_dir", _cgnet_cam_dir)', '("train_affinity.cam_dir", lambda lo: lo.cam_dir())', _K + "test_later_stages_read_the_cgnet_cams_whatever_cam_source"),
    m("the random walk reads the CAMs of cam.source (not the CGNet's)", "caee/stages/table.py",
      '("pseudo_labels.cam_dir", _cgnet_cam_dir)', '("pseudo_labels.cam_dir", lambda lo: lo.cam_dir())', _K + "test_later_stages_read_the_cgnet_cams_whatever_cam_source"),
    m("random-weight backbones frozen as ImageNet ones", "caee/models/backbone.py",
      "self.freeze_bn = type(self).freeze_bn and trained\n        if not trained:\n            return",
      "self.freeze_bn = type(self).freeze_bn\n        if False:\n            return",
      "tests/test_backbones.py::test_freeze_of_random_weights_freezes_nothing_and_batchnorm_trains"),
    m("DeepLab freezes a backbone that starts from random weights", "caee/stages/train_deeplab.py",
      "model.backbone.freeze(bool(tc.net.pretrained or tc.init))", "model.backbone.freeze()",
      _K + "test_trainers_freeze_the_backbone_only_when_it_starts_from_trained_weights"),
    m("VGG16 ignores net.width", "caee/models/vgg16.py",
      "v if v == \"M\" else max(1, int(round(v * width)))", "v",
      "tests/test_backbones.py::test_vgg16_width_scales_every_layer_and_keeps_the_layout"),
    # ---- never silently wrong (bad input, write faults)
    m("write faults escape the atomic writer as tracebacks", "caee/core/io.py",
      "fault = write_fault(path, e) if isinstance(e, OSError) else None", "fault = None",
      "tests/test_safety.py::test_a_write_fault_keeps_the_file_it_was_replacing"),
    m("one dotted key of a net block resets the section's other network defaults", "caee/core/config.py",
      "kwargs = {k: _coerce(_onto_default(fields[k], v), hints[k], prefix + k)",
      "kwargs = {k: _coerce(v, hints[k], prefix + k)",
      "tests/test_safety.py::test_keys_a_stage_does_not_read_are_refused_away_from_their_defaults"),
    m("a key no stage reads is accepted and ignored", "caee/core/config_rules.py",
      "    _check_not_read(cfg)\n", "",
      "tests/test_safety.py::test_keys_a_stage_does_not_read_are_refused_away_from_their_defaults"),
    m("a YAML key given twice keeps the last value", "caee/core/config.py",
      "if key_node.value in first:", "if False:", "tests/test_safety.py::test_yaml_key_given_twice_names_both_lines"),
    m("uncropped images of random sizes batched", "caee/core/config_rules.py",
      "if t.crop_size == 0 and resize[0] != resize[1] and t.batch_size > 1:", "if False:",
      "tests/test_safety.py::test_training_sizes_must_be_reachable"),
    m("a split listing an image twice counts it twice", "caee/data/splits.py",
      "if image_id in first_line:", "if False:",
      "tests/test_safety.py::test_split_lists_refuse_dotdot_duplicates_and_blank_names"),
    m("masks deriving image labels not size-checked", "caee/data/splits.py",
      "    check_mask_size(label, image_path, path)\n", "",
      "tests/test_safety.py::test_masks_deriving_image_labels_are_size_checked"),
]


def copy_repo(dst: Path) -> Path:
    root = dst / "repo"
    shutil.copytree(REPO, root, ignore=IGNORE)
    return root


def apply(root: Path, mut: Mutation) -> tuple[str, str | None]:
    """Apply ``mut`` in the copy. Returns (original text, error or None)."""
    path = root / mut.file
    if not path.is_file():
        return "", f"file not found: {mut.file}"
    text = original = path.read_text()
    for old, new in mut.edits:
        count = text.count(old)
        if count != 1:
            return original, f"pattern not found ({count} matches): {old.strip()[:60]!r}"
        text = text.replace(old, new)
    path.write_text(text)
    return original, None


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float]:
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        rc = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = -1
    return rc, time.monotonic() - start


def check_copy_is_imported(root: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", "import caee; print(caee.__file__)"], cwd=root, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(root.resolve()):
        sys.exit(f"the copy's caee is not the one imported ({out}); cannot run the mutation check")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only the mutations whose name contains this text")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--patterns", action="store_true",
                    help="only check that every mutation's text is found exactly once (no tests run)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutation's test run")
    args = ap.parse_args(argv)
    muts = [x for x in MUTATIONS if args.k.lower() in x.name.lower()]
    if args.list:
        for x in muts:
            print(f"{x.name}  [{x.file}]  {' '.join(x.tests)}")
        return 0
    if args.patterns:
        bad = 0
        for x in muts:
            text = (REPO / x.file).read_text() if (REPO / x.file).is_file() else ""
            for old, _ in x.edits:
                if text.count(old) != 1:
                    bad += 1
                    print(f"pattern not found ({text.count(old)} matches): {x.name} [{x.file}]: {old.strip()[:60]!r}")
        print(f"{len(muts) - bad} of {len(muts)} mutations apply")
        return 1 if bad else 0
    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="caee_mutation_") as tmp:
        root = copy_repo(Path(tmp))
        check_copy_is_imported(root)
        # the covering tests must pass on the unmutated copy, or "caught" would mean nothing
        clean_tests = tuple(sorted({t for x in muts for t in x.tests}))
        rc, secs = run_tests(root, clean_tests, args.timeout * 3)
        print(f"clean copy: {len(clean_tests)} test files {'pass' if rc == 0 else f'FAIL (exit {rc})'} "
              f"({secs:.0f} s)", flush=True)
        if rc != 0:
            return 1
        for x in muts:
            original, err = apply(root, x)
            if err is None:
                rc, secs = run_tests(root, x.tests, args.timeout)
                (root / x.file).write_text(original)
                caught = rc == 1  # tests failed; 2+ = interrupted/collection error, -1 = timeout
                verdict = "yes" if caught else ("no" if rc == 0 else f"error (exit {rc})")
            else:
                verdict, secs = err, 0.0
            ok &= verdict == "yes"
            rows.append((x.name, ", ".join(t.removeprefix("tests/") for t in x.tests), verdict))
            print(f"  {verdict:>4}  {x.name} ({secs:.0f} s)", file=sys.stderr, flush=True)
    print("\n| mutation | test files | caught |\n|---|---|---|")
    for name, tests, verdict in rows:
        print(f"| {name} | {tests} | {verdict} |")
    n_caught = sum(r[2] == "yes" for r in rows)
    print(f"\n{n_caught} of {len(rows)} mutations caught")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
