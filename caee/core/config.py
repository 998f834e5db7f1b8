"""Strict experiment configuration: dataclasses filled from YAML plus ``key=value`` overrides.

One experiment file holds the sections of every stage, so all stage scripts take the same file.
A file may extend another with ``base: other.yaml`` (path relative to the file). Unknown keys and
wrong types are errors naming the key and the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from caee.core import config_rules
from caee.core.errors import CaeeError, not_found
from caee.core.io import write_text


class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives one key twice (PyYAML would keep the last value without a word)."""


class _Yaml12Loader(yaml.SafeLoader):
    """safe_load plus YAML 1.2 floats: ``1e-3`` / ``5E-4`` (no dot) are numbers, not strings; a key
    given twice in one mapping is an error naming the key and both lines."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys merged in with '<<' may be overridden, as YAML intends
                line = key_node.start_mark.line + 1
                if key_node.value in first:
                    raise DuplicateKeyError(f"key '{key_node.value}' is given twice (lines {first[key_node.value]} "
                                            f"and {line}); keep one")
                first[key_node.value] = line
        return super().construct_mapping(node, deep)


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _safe_load(text) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass

# ---------------------------------------------------------------- sections


@dataclasses.dataclass
class SyntheticConfig:
    """The built-in synthetic dataset (generated into ``data.root`` when that folder is absent)."""
    image_size: int = 96            # side of the square images (px)
    num_classes: int = 5            # foreground classes
    num_train: int = 3000           # images of the train split
    num_val: int = 600              # images of the val split
    # [min, max] objects per image (uniform, inclusive)
    objects_per_image: list[int] = dataclasses.field(default_factory=lambda: [1, 3])
    # [min, max] radius (px; the ellipse's major semi-axis), uniform
    object_radius: list[int] = dataclasses.field(default_factory=lambda: [14, 22])
    part_size: int = 6            # side of the small, strongly discriminative emblem (pixels)
    part_hidden_prob: float = 0.25  # fraction of objects drawn without their emblem
    body_saturation: float = 0.15   # weak class tint of the body
    stripe_period: float = 5.0      # body stripes: period (px), relative luminance amplitude,
    stripe_amplitude: float = 0.35  # and sd of the angle jitter around the class angle (stripe_angles)
    stripe_jitter_deg: float = 10.0  # sd (degrees) of the stripe angle around its class angle
    # stripe amplitude falls linearly with the distance from the object's centre, from full at the
    # centre to (1 - stripe_fade) of it on the outline: 0 = uniform stripes; 1 = none on the outline
    stripe_fade: float = 0.0        # fade of the stripes towards the outline (0 = none, 1 = gone there)
    # class angle of the stripes: "full" = pi * c / C (docs/METHOD.md §10); there classes c and
    # C - c are mirror images, so horizontal-flip augmentation makes their stripes identical.
    # "mirror_free" = (pi / 2) * c / (C - 1): angles in [0, 90] degrees, distinct under flips.
    stripe_angles: Literal["full", "mirror_free"] = "full"
    object_aspect: list[float] = dataclasses.field(default_factory=lambda: [0.7, 1.0])  # minor / major axis
    wobble: float = 0.12            # radial wobble of the blob outline (relative amplitude, harmonics 2-5)
    noise_std: float = 0.03         # per-pixel Gaussian noise (image values in [0, 1])
    min_visible_px: int = 20        # objects with fewer visible pixels are set to 255 and not labelled
    ignore_band: int = 0            # > 0: a 255 band of this many px on each side of object boundaries
    image_format: Literal["jpg", "png"] = "jpg"  # jpg: quality 95, 4:4:4 (keeps the emblem colour)
    seed: int = 0                   # generator seed; image i of a split is drawn from (seed, split, i)


@dataclasses.dataclass
class DataConfig:
    """Where the images and labels are and how they are loaded."""
    # voc (20 classes), coco (80), custom (labels CSV), synthetic (generated into root)
    dataset: Literal["voc", "coco", "custom", "synthetic"] = "synthetic"
    root: str = "data/synthetic"    # dataset folder (VOC-style layout, caee/data/splits.py)
    train_split: str = "train"      # classifier / CGNet / AffinityNet / DeepLab training list
    cam_split: str = "train"        # images whose CAMs / pseudo labels are made and measured
    val_split: str = "val"          # final segmentation evaluation
    # custom datasets: image folder, mask folder (optional) and a labels CSV (see caee/data/custom.py)
    image_dir: str = "JPEGImages"
    mask_dir: str = "SegmentationClassAug"  # training masks (VOC: train_aug); labels come from them unless cached / CSV
    eval_mask_dir: str = "SegmentationClass"  # ground truth used for evaluation (VOC: the 1,464/1,449 masks)
    labels_csv: str = ""            # image-level labels CSV (needed by custom; if set, replaces labels from masks)
    num_workers: int = 2            # DataLoader worker processes of the stages
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)


@dataclasses.dataclass
class NetConfig:
    """A network: backbone name, width and ImageNet initialisation."""
    # docs/METHOD.md §2; tinycnn: a small CPU network for the synthetic demo; resnet50: IRN's (stride 16)
    backbone: Literal["resnet38", "resnet50", "resnet101", "vgg16", "tinycnn"] = "resnet38"
    width: float = 1.0              # channel multiplier (ResNet38 / VGG16 / tinycnn); 1.0 = the paper
    pretrained: str = ""            # ImageNet weights: MXNet .params or .pth ("{weights_dir}/<file>"); "" = random init
    dropout: float = 0.5            # Dropout2d before fc8 (PSA's classifier); CGNet official: 0
    # output stride of the last feature map; 0 = the backbone's own (resnet38 8, vgg16 8, resnet50 /
    # resnet101 16, tinycnn 4); tinycnn also takes 8 (its third stage strided as well)
    output_stride: int = 0


@dataclasses.dataclass
class TrainConfig:
    """Settings shared by the four trainers (classifier, CGNet, AffinityNet, DeepLab)."""
    batch_size: int = 16            # global batch (split over torchrun processes); PSA classifier: 16
    epochs: int = 15                # passes over the training split; the lr schedule spans them
    max_steps: int = 0              # > 0 stops early (tests, smoke runs); the schedule still spans `epochs`
    optimizer: Literal["sgd", "adam"] = "sgd"  # sgd (with momentum) or adam (AdamW; momentum unused)
    # poly: (1 - t)^poly_power; onecycle: 30 % linear warm-up, then cosine to 0
    schedule: Literal["poly", "onecycle"] = "poly"
    lr: float = 0.01                # base lr; 0.01 + momentum 0.9: standard SGD (PSA classifier: 0.1, no momentum)
    momentum: float = 0.9           # SGD momentum (PSA's optimisers effectively get none)
    weight_decay: float = 5e-4      # on weights only; biases get none (PSA)
    poly_power: float = 0.9         # exponent of the poly schedule (PSA)
    head_lr_mult: float = 10.0      # new layers
    bias_lr_mult: float = 2.0       # biases: 2x lr, no weight decay (PSA)
    crop_size: int = 448            # random square crop (px), padding smaller images (mask: 255); 0 = no crop
    # long side resized to a random integer in [low, high] (PSA); [0, 0] = off
    resize_long: list[int] = dataclasses.field(default_factory=lambda: [256, 512])
    hflip: bool = True              # random horizontal flip
    # [brightness, contrast, saturation, hue] (PSA)
    color_jitter: list[float] = dataclasses.field(default_factory=lambda: [0.3, 0.3, 0.3, 0.1])
    seed: int = 0                   # seeds initialisation, data order and augmentation
    amp: bool = True                # bf16 autocast (CUDA only); CAM mIoU effect measured in docs/NUMERICS.md
    channels_last: bool = True      # CUDA only
    # SGD update of each parameter inside backward, its gradient freed at once: less peak memory,
    # the same weights (tests/test_engine.py); sgd, one process, no gradient clipping
    step_in_backward: bool = False
    checkpoint_every: int = 500     # steps between last.pth writes (and at every epoch end)
    log_every: int = 20             # steps between metrics.jsonl records and INFO lines (loss, lr, images/s, ETA)
    keep_epochs: bool = False       # also keep each epoch's weights as epoch_<n>.pth (the official code saves every epoch)
    init: str = ""                  # start from these weights instead of ImageNet (our model.pth or PSA .pth)
    overwrite: bool = False         # start over: delete this trainer's last.pth / model.pth / metrics.jsonl first


@dataclasses.dataclass
class ClassifierTrainConfig(TrainConfig):
    net: NetConfig = dataclasses.field(default_factory=NetConfig)


@dataclasses.dataclass
class MaskingConfig:
    """Class-specific erasing (docs/METHOD.md §3)."""
    depth: int = 0                  # 0 = erase the image; d >= 1 = mask the OC's feature map at depth d
    normalization: Literal["batch", "per_image"] = "batch"  # official: max over the whole batch
    cse_init: float = 0.3           # w(epoch) = cse_init + cse_slope * epoch
    cse_slope: float = 0.05         # increase of the erasing-loss weight w per epoch (official)


def _cgnet_net() -> NetConfig:
    return NetConfig(backbone="resnet38", dropout=0.0)


@dataclasses.dataclass
class CGNetTrainConfig(TrainConfig):
    net: NetConfig = dataclasses.field(default_factory=_cgnet_net)
    oc_weights: str = ""            # "" = <work_dir>/train_classifier/model.pth; or a PSA res38_cls.pth
    select_by_oracle: bool = False  # official: keep the epoch with the best CAM mIoU on train GT (an oracle)
    # float32 (official): bf16 training moved the CGNet's CAM mIoU by 0.51 points (> 0.5) on a reduced
    # demo, one seed (docs/NUMERICS.md); the other trainers and CAM inference keep bf16 on CUDA
    amp: bool = False


@dataclasses.dataclass
class CamConfig:
    """Multi-scale CAM inference (make_cam.py, docs/METHOD.md §4)."""
    # network whose CAMs are made: the CGNet or the ordinary classifier (OC)
    source: Literal["cgnet", "classifier"] = "cgnet"
    weights: str = ""               # "" = <work_dir>/train_<source>/model.pth
    out_dir: str = ""               # "" = <work_dir>/cam_<source>
    split: str = ""                 # "" = data.cam_split
    # input scales of the passes (official)
    scales: list[float] = dataclasses.field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    flip: bool = True               # also run every scale mirrored (official)
    resize: Literal["pil_bicubic", "bilinear"] = "pil_bicubic"  # official (OC-CSE/PSA MSF data): PIL bicubic on uint8
                                    # before normalising; bilinear: F.interpolate on the normalised tensor (on the device)
    batch_size: int = 1             # images per DataLoader batch; equal-sized ones share each forward
    dtype: Literal["float16", "float32"] = "float16"  # CAM files; vs float32: mIoU -0.0007 points (docs/NUMERICS.md)
    crf_alphas: list[float] = dataclasses.field(default_factory=list)  # e.g. [4, 24]: CRF label PNGs in <out_dir>_crf_<alpha>
    overwrite: bool = False         # recompute existing outputs (else they are skipped)
    amp: bool = True                # bf16 autocast (CUDA only); CAM mIoU effect measured in docs/NUMERICS.md
    pictures: int = 0               # image | GT | CAM pictures of the first N images, in <out_dir>_pictures


@dataclasses.dataclass
class CrfConfig:
    iterations: int = 10            # mean-field iterations (official, PSA; docs/METHOD.md §5)
    gaussian_sxy: float = 3         # Gaussian kernel: position sd (px)
    gaussian_compat: float = 3      # Gaussian kernel: weight (Potts compat)
    bilateral_sxy: float = 80       # bilateral kernel: position sd (px)
    bilateral_srgb: float = 13      # bilateral kernel: RGB sd
    bilateral_compat: float = 10    # bilateral kernel: weight (Potts compat)
    min_prob: float = 1e-5          # scores floored here before -log; official: pydensecrf unary_from_softmax's clip
    workers: int = 0                # CRF processes; 0 = this machine's cores shared by its ranks


@dataclasses.dataclass
class EvalConfig:
    dir: str = ""                   # folder to evaluate; "" = the CAMs of cam.source (cam.out_dir)
    kind: Literal["auto", "cam", "label"] = "auto"  # auto: .npz files -> cam, .png files -> label
    split: str = ""                 # "" = data.cam_split
    out: str = ""                   # result JSON; "" = <work_dir>/eval/<folder name>_<split>.json
    # CAM background thresholds swept (threshold is added); the best of them is an oracle
    thresholds: list[float] = dataclasses.field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)])
    threshold: float = 0.25         # fixed in advance; reported next to the (oracle) best of the sweep
    allow_missing: bool = False     # skip (and count) missing / unreadable / wrongly sized predictions
    workers: int = 0                # 0 = all cores


@dataclasses.dataclass
class AffinityTrainConfig(TrainConfig):
    """AffinityNet training (docs/METHOD.md §6); defaults are PSA's train_aff settings."""
    # PSA (train_aff.py): batch 8, 8 epochs, lr 0.1 (heads 10x), wd 5e-4; colour jitter, random
    # crop 448 (zero padding), flip, and no rescale. PSA's SGD gets weight_decay as its positional
    # momentum argument, so its momentum is 5e-4, i.e. none: 0 here (with 0.9 the effective lr is
    # ~10x higher; lower lr accordingly).
    batch_size: int = 8
    epochs: int = 8                 # official (PSA train_aff.py)
    lr: float = 0.1                 # official (PSA train_aff.py); new layers at 10x
    momentum: float = 0.0           # official (PSA train_aff.py: its SGD gets no effective momentum)
    resize_long: list[int] = dataclasses.field(default_factory=lambda: [0, 0])  # official (PSA train_aff.py): no rescale; label_rule psa needs [0, 0]
    # psa: PSA's train_aff.py labels (la/ha CRF posteriors cropped with the image, averaged per
    # feature cell, argmax, la bg -> 255, ha bg -> 0, padding -> 255); top_left: argmax label PNGs
    # merged per pixel, the top-left pixel of each cell (caee's earlier rule; allows resize_long)
    label_rule: Literal["psa", "top_left"] = "psa"  # official (PSA train_aff.py): psa; alternative top_left
    net: NetConfig = dataclasses.field(default_factory=NetConfig)
    cam_dir: str = ""               # "" = <work_dir>/cam_cgnet
    la_alpha: float = 4             # low alpha: strong bg (1 - max CAM)^alpha; its bg cells = unsure (PSA paper)
    ha_alpha: float = 24            # high alpha: weak bg; its bg cells = confident bg (PSA paper; PSA code: 32)
    radius: int = 5                 # cell pairs within this radius give the targets (feature cells; PSA)
    psa_border: bool = True         # PSA's pair set (pairs start >= radius-1 px from left/right/bottom)
    head_channels: list[int] = dataclasses.field(default_factory=lambda: [64, 128, 256])  # f8_3/f8_4/f8_5 (PSA)
    # stride of the embeddings and so of the random walk's grid; 0 = the backbone's (PSA: 8 for
    # ResNet38). Smaller: the features are upsampled to it (see caee/models/affinitynet.py).
    embed_stride: int = 0


@dataclasses.dataclass
class PseudoLabelConfig:
    # the pseudo-label generator of `caee run` (DeepLab trains on its labels): the paper's PSA
    # AffinityNet + random walk, or IRN's boundary network + walk (section irn, docs/METHOD.md §12)
    method: Literal["affinitynet", "irn"] = "affinitynet"
    compare: bool = False           # caee run also makes the other generator's labels from the same CAMs (results row)
    cam_dir: str = ""               # "" = <work_dir>/cam_cgnet
    weights: str = ""               # "" = <work_dir>/train_affinity/model.pth
    out_dir: str = ""               # "" = <work_dir>/pseudo_labels
    split: str = ""                 # "" = data.cam_split
    beta: float = 8                 # affinities raised to this power before normalising (official, PSA)
    steps: int = 256                # random-walk steps (official, PSA)
    alpha: float = 16               # background score (1 - max CAM)^alpha (official, PSA)
    radius: int = 5                 # affinity pairs within this radius (feature cells; official, PSA)
    psa_border: bool = False        # False: every pair within the radius; True: PSA's inference pair set
    crf: bool = False               # dense CRF (crf section) on the upsampled random-walk scores
    overwrite: bool = False         # recompute existing label PNGs (else they are skipped)


def _irn_net() -> NetConfig:
    return NetConfig(backbone="resnet50", dropout=0.0)


def _irn_crf() -> CrfConfig:
    return CrfConfig(bilateral_sxy=50, bilateral_srgb=5)


@dataclasses.dataclass
class IrnConfig(TrainConfig):
    """IRN's class-boundary route (train_irn, make_irn_labels; docs/METHOD.md §12); defaults are
    those of IRN's run_sample.py / step/*.py (jiwoon-ahn/irn)."""
    batch_size: int = 32            # official (IRN run_sample.py irn_batch_size)
    epochs: int = 3                 # official (IRN run_sample.py irn_num_epoches)
    lr: float = 0.1                 # official (IRN run_sample.py irn_learning_rate)
    weight_decay: float = 1e-4      # official (IRN run_sample.py irn_weight_decay)
    momentum: float = 1e-4          # official (IRN torchutils.PolyOptimizer hands weight_decay to SGD's momentum slot)
    head_lr_mult: float = 1.0       # official (IRN train_irn.py: the boundary layers at 1x lr)
    bias_lr_mult: float = 1.0       # official (IRN train_irn.py: no separate bias group)
    crop_size: int = 512            # official (IRN run_sample.py irn_crop_size); also the inference padding (EdgeDisplacement)
    resize_long: list[int] = dataclasses.field(default_factory=lambda: [0, 0])  # off: IRN rescales by scale_range
    scale_range: list[float] = dataclasses.field(default_factory=lambda: [0.5, 1.5])  # official (IRN train_irn.py rescale)
    color_jitter: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # official (IRN: none)
    net: NetConfig = dataclasses.field(default_factory=_irn_net)  # official (IRN: ResNet50, stride 16, torchvision ImageNet weights)
    cam_dir: str = ""               # "" = <work_dir>/cam_cgnet; any caee CAM folder (cgnet, classifier, control)
    conf_fg_thres: float = 0.30     # official (IRN run_sample.py): bg score of the map giving confident fg
    conf_bg_thres: float = 0.05     # official (IRN run_sample.py): bg score of the map giving confident bg
    crf: CrfConfig = dataclasses.field(default_factory=_irn_crf)  # official (IRN crf_inference_label: bilateral 50/5/10)
    crf_gt_prob: float = 0.7        # official (IRN crf_inference_label gt_prob): trust in the hard label
    train_radius: int = 10          # official (IRN train_irn.py PathIndex(radius=10)): pairs of the loss
    edge_stride: int = 4            # official (IRN: boundary map at stride 4)
    edge_channels: int = 32         # official (IRN fc_edge1..5 width)
    edge_groups: int = 4            # official (IRN GroupNorm(4, 32))
    # CAMs (image resolution) -> boundary grid: cell_mean = mean of each stride x stride cell (the
    # value at the cell centre that IRN's x4 upsampling assumes); bilinear = F.interpolate to the grid
    cam_grid: Literal["cell_mean", "bilinear"] = "cell_mean"
    weights: str = ""               # make_irn_labels: "" = <work_dir>/train_irn/model.pth
    out_dir: str = ""               # make_irn_labels: "" = <work_dir>/pseudo_labels_irn
    split: str = ""                 # make_irn_labels: "" = data.cam_split
    beta: float = 10                # official (IRN run_sample.py beta): affinities raised to this power
    exp_times: int = 8              # official (IRN run_sample.py exp_times): 2^8 = 256 walk steps
    radius: int = 5                 # official (IRN make_sem_seg_labels.py propagate_to_edge radius=5)
    sem_seg_bg_thres: float = 0.25  # official (IRN run_sample.py): background score after the walk


@dataclasses.dataclass
class DeeplabTrainConfig(TrainConfig):
    net: NetConfig = dataclasses.field(default_factory=NetConfig)
    head: Literal["largefov", "aspp"] = "largefov"  # largefov (DeepLab-v1, docs/METHOD.md §7) or aspp (DeepLab-v2)
    label_dir: str = ""             # "" = pseudo_labels.out_dir (<work_dir>/pseudo_labels); or a ground-truth folder for an upper bound
    # test-time input scales; their softmax probabilities are averaged
    test_scales: list[float] = dataclasses.field(default_factory=lambda: [1.0])
    test_flip: bool = False         # also each scale's mirror image
    test_crf: bool = False          # dense CRF (crf section) on the averaged probabilities: pred_<split>_crf
    # DeepLab-v1 / ResNet38 recipe (docs/METHOD.md §7): batch 10, lr 1e-3, ~20k iterations on
    # train_aug (20 epochs x 1,058 steps); no colour jitter (scale + crop + flip only)
    batch_size: int = 10
    epochs: int = 20                # DeepLab-v1 recipe: ~20k iterations on train_aug
    lr: float = 1e-3                # DeepLab-v1 recipe
    # no colour jitter (DeepLab-v1 recipe)
    color_jitter: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    split: str = ""                 # training images; "" = pseudo_labels.split, else data.cam_split (where the
                                    # pseudo labels are made); label_dir must hold <id>.png for every image of it
    head_channels: int = 0          # LargeFOV fc6/fc7 width; 0 = 1024 (x net.width for resnet38 / vgg16; tinycnn: 4 x its channels)
    head_dilations: list[int] = dataclasses.field(default_factory=list)  # [] = largefov [12], aspp [6, 12, 18, 24]
    head_dropout: float = 0.5       # LargeFOV Dropout2d after fc6 and fc7
    eval_split: str = ""            # "" = data.val_split
    eval_only: bool = False         # skip training; segment eval_split with `weights`
    weights: str = ""               # eval_only: "" = <work_dir>/train_deeplab/model.pth


@dataclasses.dataclass
class PipelineConfig:
    """What run_pipeline.py adds around the stages."""
    control: bool = True            # also train a CGNet WITHOUT the erasing loss (w = 0) and report its CAMs
    pictures: int = 6               # images in the Fig. III / Fig. IV style pictures


@dataclasses.dataclass
class LoggingConfig:
    """Monitoring of the trainers (caee/engine/monitor.py)."""
    tensorboard: bool = False       # also write TensorBoard scalars to <stage dir>/tb (needs `pip install tensorboard`)


@dataclasses.dataclass
class Config:
    # stage outputs go to <work_dir>/<stage>; "{work_dir}" in any path is replaced by it
    work_dir: str = "work_dirs/demo"
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    weights_dir: str = "weights"    # folder of the ImageNet files; "{weights_dir}" in any path is replaced by it
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train_classifier: ClassifierTrainConfig = dataclasses.field(default_factory=ClassifierTrainConfig)
    masking: MaskingConfig = dataclasses.field(default_factory=MaskingConfig)
    train_cgnet: CGNetTrainConfig = dataclasses.field(default_factory=CGNetTrainConfig)
    cam: CamConfig = dataclasses.field(default_factory=CamConfig)
    crf: CrfConfig = dataclasses.field(default_factory=CrfConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    train_affinity: AffinityTrainConfig = dataclasses.field(default_factory=AffinityTrainConfig)
    pseudo_labels: PseudoLabelConfig = dataclasses.field(default_factory=PseudoLabelConfig)
    irn: IrnConfig = dataclasses.field(default_factory=IrnConfig)
    train_deeplab: DeeplabTrainConfig = dataclasses.field(default_factory=DeeplabTrainConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)


# ---------------------------------------------------------------- building from plain data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise CaeeError(f"config key '{key}' must be a mapping of {tp.__name__} settings, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(c) for c in typing.get_args(tp))
            raise CaeeError(f"config key '{key}' must be one of {choices}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        return _coerce(value, next(a for a in typing.get_args(tp) if a is not type(None)), key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise CaeeError(f"config key '{key}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise CaeeError(f"config key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise CaeeError(f"unknown config key '{prefix}{key}'{hint}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: _coerce(_onto_default(fields[k], v), hints[k], prefix + k) for k, v in data.items()}
    built = cls(**kwargs)
    if cls is Config:
        config_rules.check(built)
    return built


def _onto_default(field: dataclasses.Field, value: Any) -> Any:
    """A mapping given for a nested settings block, completed from the block's default in this section:
    ``train_cgnet.net.width=0.5`` or a YAML ``net:`` block keeps the CGNet's other network defaults
    (dropout 0.0), not the plain NetConfig's (0.5)."""
    if not isinstance(value, dict) or field.default_factory is dataclasses.MISSING:
        return value
    default = field.default_factory()
    return _deep_merge(dataclasses.asdict(default), value) if dataclasses.is_dataclass(default) else value


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise CaeeError(f"config 'base' chain loops back to {path}")
    if not path.is_file():
        raise CaeeError(f"config file {not_found(path)}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CaeeError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except OSError as e:
        raise CaeeError(f"{path}: cannot read the config ({e.strerror})") from None
    try:
        data = _safe_load(text) or {}
    except yaml.YAMLError as e:
        raise CaeeError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise CaeeError(f"{path}: a config file must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    return _deep_merge(_read_yaml(path.parent / base, seen + (path,)), data)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise CaeeError(f"override '{dotted}': '{p}' is not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "c=[1, 2]"]`` -> nested dict; values are parsed as YAML scalars / lists."""
    data: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CaeeError(f"override '{item}' must look like section.key=value")
        try:
            value = _safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (following ``base:``), apply dotted overrides and build a checked :class:`Config`."""
    data = _read_yaml(Path(path)) if path else {}
    data = _deep_merge(data, parse_overrides(overrides or []))
    cfg = _build(Config, data)
    check_device(cfg.device)
    return cfg


def check_device(name: str) -> None:
    """``device`` must name a device this machine has (torch is imported only for a CUDA request)."""
    m = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", name)
    if m is None:
        raise CaeeError(f"config key 'device' must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(m.group(1) or 0)
        if index >= count:
            have = f"{count} CUDA devices" if count else "no CUDA GPU"
            raise CaeeError(f"config key 'device' is {name!r} but this machine has {have}; use device=cpu or auto")


def replace(cfg: Config, **sections: Any) -> Config:
    """A copy of ``cfg`` with fields of its sections replaced: ``cam={"source": "classifier"}``."""
    out = dataclasses.replace(cfg)
    for section, fields in sections.items():
        setattr(out, section, dataclasses.replace(getattr(cfg, section), **fields) if isinstance(fields, dict)
                else fields)
    return out


def expand_work_dir(cfg: Config) -> Config:
    """``cfg`` with ``{work_dir}`` in every string value replaced by ``cfg.work_dir`` (and
    ``{weights_dir}`` by ``cfg.weights_dir``: the ImageNet files' folder is set once).

    Lets a config start one stage from an earlier stage's weights of the same experiment
    (``init: "{work_dir}/train_cgnet/model.pth"``). Each stage expands its own config when it
    starts, so derived experiments (the control run, the reproduction drivers' variants, which
    move ``work_dir``) point at their own folders.
    """
    places = {"{work_dir}": str(cfg.work_dir), "{weights_dir}": str(cfg.weights_dir)}
    return _build(Config, _substitute_work_dir(config_to_dict(cfg), places))


def _substitute_work_dir(data: Any, places: dict[str, str]) -> Any:
    if isinstance(data, dict):
        return {k: v if k in ("work_dir", "weights_dir") else _substitute_work_dir(v, places)
                for k, v in data.items()}
    if isinstance(data, list):
        return [_substitute_work_dir(v, places) for v in data]
    if isinstance(data, str):
        for place, value in places.items():
            data = data.replace(place, value)
    return data


def config_from_dict(data: dict) -> Config:
    return _build(Config, data)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, directory: str | Path) -> Path:
    """Write the resolved config as ``<directory>/config.yaml``."""
    path = Path(directory) / "config.yaml"
    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path

