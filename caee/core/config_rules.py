"""Allowed ranges of the numeric config keys, kept in one table apart from the dataclasses.

A rule is looked up by the full dotted key first (``train_affinity.head_channels``), then by the
section-less suffix (``synthetic.num_classes``), then by the leaf name (``lr``: every trainer), so
one line covers a key shared by the four trainer sections. Every numeric field of
:class:`caee.core.config.Config` must have a rule (tests/test_safety.py::test_every_numeric_config_key_has_a_range_rule checks it), so a new key
cannot slip through unchecked. Lists of numbers are checked item by item.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

from caee.core.errors import CaeeError


class Range(NamedTuple):
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False       # True: lo itself is not allowed
    hi_open: bool = False

    def holds(self, v: float) -> bool:
        if math.isnan(v):
            return False
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def describe(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


POSITIVE = Range(0, lo_open=True)          # sizes, counts, learning rates, scales
NON_NEGATIVE = Range(0)                    # optional counts (0 = off / default), decays
AT_LEAST_ONE = Range(1)
PROBABILITY = Range(0, 1)
FRACTION = Range(0, 1, hi_open=True)       # dropout, momentum: 1 would stop learning
THRESHOLD = Range(0, 1, lo_open=True, hi_open=True)

RULES: dict[str, Range] = {
    # top level / data
    "num_workers": NON_NEGATIVE,
    "workers": NON_NEGATIVE,
    "seed": NON_NEGATIVE,
    "pictures": NON_NEGATIVE,
    # synthetic data
    "synthetic.image_size": Range(8),
    "synthetic.num_classes": AT_LEAST_ONE,
    "synthetic.num_train": AT_LEAST_ONE,
    "synthetic.num_val": AT_LEAST_ONE,
    "synthetic.objects_per_image": AT_LEAST_ONE,
    "synthetic.object_radius": AT_LEAST_ONE,
    "synthetic.part_size": AT_LEAST_ONE,
    "synthetic.part_hidden_prob": PROBABILITY,
    "synthetic.body_saturation": PROBABILITY,
    "synthetic.stripe_period": POSITIVE,
    "synthetic.stripe_amplitude": PROBABILITY,
    "synthetic.stripe_fade": PROBABILITY,
    "synthetic.stripe_jitter_deg": NON_NEGATIVE,
    "synthetic.object_aspect": Range(0, 1, lo_open=True),
    "synthetic.wobble": Range(0, 1, hi_open=True),
    "synthetic.noise_std": NON_NEGATIVE,
    "synthetic.min_visible_px": NON_NEGATIVE,
    "synthetic.ignore_band": NON_NEGATIVE,
    # networks
    "width": POSITIVE,
    "dropout": FRACTION,
    "output_stride": NON_NEGATIVE,            # 0 = the backbone's own; build_backbone checks the rest
    "head_dropout": FRACTION,
    # the four trainers
    "batch_size": AT_LEAST_ONE,               # also cam.batch_size
    "epochs": AT_LEAST_ONE,
    "max_steps": NON_NEGATIVE,                # 0 = the whole schedule
    "lr": POSITIVE,
    "momentum": FRACTION,
    "weight_decay": NON_NEGATIVE,
    "poly_power": POSITIVE,
    "head_lr_mult": POSITIVE,
    "bias_lr_mult": POSITIVE,
    "crop_size": NON_NEGATIVE,                # 0 = no crop
    "resize_long": NON_NEGATIVE,              # [0, 0] = no resize
    "color_jitter": NON_NEGATIVE,
    "checkpoint_every": AT_LEAST_ONE,
    "log_every": AT_LEAST_ONE,
    # class-specific erasing
    "masking.depth": NON_NEGATIVE,
    "masking.cse_init": NON_NEGATIVE,
    "masking.cse_slope": NON_NEGATIVE,
    # CAMs and CRF
    "cam.scales": POSITIVE,
    "cam.crf_alphas": POSITIVE,
    "crf.iterations": NON_NEGATIVE,
    "crf.gaussian_sxy": POSITIVE,
    "crf.gaussian_compat": NON_NEGATIVE,
    "crf.bilateral_sxy": POSITIVE,
    "crf.bilateral_srgb": POSITIVE,
    "crf.bilateral_compat": NON_NEGATIVE,
    "crf.min_prob": Range(0, 1, lo_open=True, hi_open=True),  # unary clip; 1 would flatten every score
    # evaluation
    "eval.thresholds": THRESHOLD,
    "eval.threshold": THRESHOLD,
    # AffinityNet and the random walk
    "train_affinity.la_alpha": POSITIVE,
    "train_affinity.ha_alpha": POSITIVE,
    "train_affinity.head_channels": AT_LEAST_ONE,
    "train_affinity.embed_stride": NON_NEGATIVE,  # 0 = the backbone's stride
    "radius": AT_LEAST_ONE,
    "pseudo_labels.beta": POSITIVE,
    "pseudo_labels.steps": NON_NEGATIVE,
    "pseudo_labels.alpha": POSITIVE,
    # IRN (train_irn, make_irn_labels)
    "irn.scale_range": POSITIVE,
    "irn.conf_fg_thres": THRESHOLD,
    "irn.conf_bg_thres": THRESHOLD,
    "irn.crf_gt_prob": THRESHOLD,
    "irn.train_radius": Range(2),             # radius 1 has no pairs
    "irn.edge_stride": AT_LEAST_ONE,
    "irn.edge_channels": AT_LEAST_ONE,
    "irn.edge_groups": AT_LEAST_ONE,
    "irn.beta": POSITIVE,
    "irn.exp_times": Range(0, 16),            # 2^exp_times sparse steps
    "irn.radius": Range(2),
    "irn.sem_seg_bg_thres": PROBABILITY,
    # DeepLab
    "train_deeplab.test_scales": POSITIVE,
    "train_deeplab.head_channels": NON_NEGATIVE,  # 0 = the default width
    "train_deeplab.head_dilations": AT_LEAST_ONE,
}


# keys a section inherits (from TrainConfig or NetConfig) that its stage does not read: a value other
# than the section's default is refused, so that a setting is never accepted and silently ignored
NOT_READ: dict[str, str] = {
    "train_affinity.net.dropout": "AffinityNet has no dropout (PSA)",
    "train_deeplab.net.dropout": "DeepLab's dropout is train_deeplab.head_dropout (the backbone has none)",
    "irn.net.dropout": "IRN's network has no dropout",
    "irn.resize_long": "IRN rescales by irn.scale_range (official: no long-side resize)",
    "irn.color_jitter": "IRN's augmentation has no colour jitter (official)",
}


def rule_for(dotted: str) -> Range | None:
    """The rule of ``dotted`` (full key, then shorter suffixes down to the leaf name)."""
    parts = dotted.split(".")
    for start in range(len(parts)):
        rule = RULES.get(".".join(parts[start:]))
        if rule is not None:
            return rule
    return None


def numeric_fields(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every int / float field (lists included) of a config dataclass."""
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += numeric_fields(value, key + ".")
        elif _is_number(value) or (isinstance(value, list) and value and all(_is_number(v) for v in value)):
            out.append((key, value))
        elif isinstance(value, list) and not value and _list_of_numbers(f.type):
            out.append((key, value))
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _list_of_numbers(annotation: Any) -> bool:
    text = str(annotation)
    return text.startswith("list[int]") or text.startswith("list[float]")


def check(cfg: Any) -> None:
    """CaeeError naming the first key whose value is out of its range (or NaN)."""
    for key, value in numeric_fields(cfg):
        rule = rule_for(key)
        if rule is None:
            raise CaeeError(f"config key '{key}' has no range rule in caee/core/config_rules.py")
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            if not rule.holds(float(v)):
                where = f"{key}[{i}]" if isinstance(value, list) else key
                raise CaeeError(f"config key '{where}' must be {rule.describe()}, got {v!r}")
    _check_not_read(cfg)
    _check_combinations(cfg)


def _check_not_read(cfg: Any) -> None:
    """A key of :data:`NOT_READ` away from its section's default: the error names the key and why."""
    for key, why in NOT_READ.items():
        section, *path = key.split(".")
        if not hasattr(cfg, section):
            continue
        value = functools.reduce(getattr, path, getattr(cfg, section))
        default = functools.reduce(getattr, path, type(getattr(cfg, section))())
        # dropout 0.0 says what these networks do (none), so it is accepted beside the default
        allowed = [default] + ([0.0] if path[-1] == "dropout" and default != 0.0 else [])
        if value not in allowed:
            raise CaeeError(f"config key '{key}' = {value!r} is not read: {why}. Leave it at "
                            f"{' or '.join(map(repr, allowed))} (its default{', or none' if len(allowed) > 1 else ''})")


def _check_combinations(cfg: Any) -> None:
    """Keys valid alone but not together (in every trainer's section: those with a training recipe)."""
    irn = getattr(cfg, "irn", None)
    if irn is not None:
        if irn.conf_bg_thres > irn.conf_fg_thres:
            raise CaeeError(f"config key 'irn.conf_bg_thres' ({irn.conf_bg_thres}) must not exceed irn.conf_fg_thres "
                            f"({irn.conf_fg_thres}): the low threshold marks the confident background")
        if len(irn.scale_range) != 2 or irn.scale_range[0] > irn.scale_range[1]:
            raise CaeeError(f"config key 'irn.scale_range' must be [low, high] with low <= high, got {irn.scale_range}")
        if irn.edge_channels % irn.edge_groups:
            raise CaeeError(f"config key 'irn.edge_channels' ({irn.edge_channels}) must be divisible by "
                            f"irn.edge_groups ({irn.edge_groups})")
    for name, t in vars(cfg).items():
        if not hasattr(t, "step_in_backward"):
            continue
        if t.step_in_backward and t.optimizer != "sgd":
            raise CaeeError(f"config key '{name}.step_in_backward' needs {name}.optimizer=sgd, got {t.optimizer}")
        _check_sizes(name, t)


def _check_sizes(name: str, t: Any) -> None:
    """Training sizes a run can meet: a resize range [low, high] with 0 < low <= high (or [0, 0]: off),
    and uncropped images batched only when no random resize gives each its own size."""
    resize = list(t.resize_long)
    if resize != [0, 0] and (len(resize) != 2 or not 0 < resize[0] <= resize[1]):
        raise CaeeError(f"config key '{name}.resize_long' must be [low, high] with 0 < low <= high, or [0, 0] "
                        f"(no resize), got {resize}")
    if t.crop_size == 0 and resize[0] != resize[1] and t.batch_size > 1:
        raise CaeeError(f"config key '{name}.crop_size' is 0 (no crop) but {name}.resize_long={resize} gives "
                        f"every image of a batch of {t.batch_size} its own random size, which cannot be stacked; set a "
                        f"crop_size > 0, {name}.batch_size=1 or resize_long=[0, 0]")
