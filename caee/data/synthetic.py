"""The built-in synthetic dataset (docs/METHOD.md §10): whole objects, discriminative parts.

Every object is an irregular blob whose ground truth is the whole blob. Its *body* carries weak
class evidence (a low-saturation class tint and stripes at a class-specific angle, see :func:`class_angle`);
its *part* is a small square emblem in a saturated class colour, left out on a fraction of the
objects. A classifier finds the emblem first, so its CAM stops at the part: the failure the
erasing method fixes.

Layout written under ``root`` (the VOC layout, so the ordinary loader reads it)::

    JPEGImages/<id>.jpg           RGB, JPEG quality 95 without chroma subsampling (4:4:4), which
                                  keeps the 6 px emblem's colour within a few levels; with
                                  ``image_format: png`` lossless PNGs (<id>.png) instead
    SegmentationClass/<id>.png    palette label maps: 0 background, 1..C classes, 255 ignore
    SegmentationClassAug          relative symlink to SegmentationClass (the default data.mask_dir)
    ImageSets/Segmentation/{train,val}.txt
    class_names.txt               one name per line (class1 .. classC)
    cls_labels.npz                image-level labels of every image (see caee.data.splits)
    objects.csv                   per object: class, geometry, emblem box, visible pixel counts
    preview.png                   contact sheet: 8 training images above their masks
    .complete.json                completion marker holding the generating settings

Ids are ``train_00000`` / ``val_00000``. Each image has its own random stream seeded by
``(seed, split, index)``, so the output is byte-identical between runs and independent of the
number of worker processes.
"""
from __future__ import annotations

import colorsys
import concurrent.futures
import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from caee.core.config import SyntheticConfig
from caee.data.classes import synthetic_class_names
from caee.data.files import LABELS_CACHE, SPLIT_DIR, save_labels_cache
from caee.core.errors import CaeeError
from caee.core.io import atomic_write, make_folder, voc_palette, write_text

logger = logging.getLogger(__name__)

MARKER = ".complete.json"
FORMAT_VERSION = 1
_SPLITS = ("train", "val")
_PALETTE = voc_palette()
_OBJECT_FIELDS = ["image_id", "object", "class", "cx", "cy", "radius", "angle_deg", "part_x0", "part_y0",
                  "part_hidden", "visible_px", "part_visible_px"]


# ---------------------------------------------------------------- drawing


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a coarse ``(g, g, ...)`` grid to ``(size, size, ...)`` (corners aligned)."""
    g = grid.shape[0]
    pos = np.linspace(0.0, g - 1.0, size)
    i0 = np.minimum(pos.astype(int), g - 2)
    w = np.zeros((size, g), np.float32)
    w[np.arange(size), i0] = 1.0 - (pos - i0)
    w[np.arange(size), i0 + 1] = pos - i0
    rows = np.tensordot(w, grid.astype(np.float32), axes=(1, 0))          # (size, g, ...)
    return np.moveaxis(np.tensordot(w, rows, axes=(1, 1)), 0, 1)  # (size, size, ...)


def class_colour(c: int, num_classes: int, saturation: float, value: float) -> np.ndarray:
    """RGB in [0, 1] of class ``c`` (0-based): hue ``c / C``."""
    return np.array(colorsys.hsv_to_rgb(c / num_classes, saturation, value), np.float32)


def class_angle(c: int, num_classes: int, mode: str = "full") -> float:
    """Stripe angle (radians) of class ``c`` (0-based): pi c / C, or (pi / 2) c / (C - 1) for "mirror_free"."""
    if mode == "mirror_free":
        return 0.5 * np.pi * c / max(num_classes - 1, 1)
    return np.pi * c / num_classes


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency colour field + mid-frequency luminance texture, (S, S, 3) in [0, 1]."""
    colour = _upsample(rng.uniform(0.2, 0.8, (3, 3, 3)).astype(np.float32), size)
    lum = _upsample(rng.normal(0.0, 0.08, (12, 12)).astype(np.float32), size)
    return colour + lum[..., None]


def _blob(rng: np.random.Generator, cfg: SyntheticConfig, cx: float, cy: float, r: float,
          size: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """A rotated ellipse of radius ``r`` whose outline wobbles radially.

    Returns the bounding box ``(rows, cols)`` within the image, the boolean blob inside it and
    each box pixel's distance from the centre relative to the outline in its direction (0 at the
    centre, 1 on the outline).
    """
    phi = rng.uniform(0, np.pi)
    a, b = r, r * rng.uniform(cfg.object_aspect[0], cfg.object_aspect[1])
    k = np.arange(2, 6, dtype=np.float32)
    amp = rng.normal(0.0, cfg.wobble / 2, k.size).astype(np.float32)
    ph = rng.uniform(0, 2 * np.pi, k.size).astype(np.float32)
    reach = r * (1.0 + np.abs(amp).sum()) + 1.0  # the outline never leaves this radius
    y0, y1 = max(0, int(cy - reach)), min(size, int(np.ceil(cy + reach)) + 1)
    x0, x1 = max(0, int(cx - reach)), min(size, int(np.ceil(cx + reach)) + 1)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    u = (dx * np.cos(phi) + dy * np.sin(phi)) / a
    v = (-dx * np.sin(phi) + dy * np.cos(phi)) / b
    theta = np.arctan2(v, u)
    edge = 1.0 + (amp[:, None, None] * np.sin(k[:, None, None] * theta[None] + ph[:, None, None])).sum(0)
    dist2 = u * u + v * v
    return (slice(y0, y1), slice(x0, x1)), dist2 <= edge * edge, np.sqrt(dist2) / edge


def _place_part(rng: np.random.Generator, inside: np.ndarray, cx: float, cy: float, r: float,
                part: int) -> tuple[int, int] | None:
    """Top-left (x, y) of a ``part`` x ``part`` square lying wholly inside the boolean ``inside``, or None.

    Squares whose centre lies within 0.6 r of (cx, cy) are preferred.
    """
    sat = np.zeros((inside.shape[0] + 1, inside.shape[1] + 1), np.int32)
    sat[1:, 1:] = inside.cumsum(0).cumsum(1)
    window = sat[part:, part:] - sat[:-part, part:] - sat[part:, :-part] + sat[:-part, :-part]
    ys, xs = np.nonzero(window == part * part)
    if ys.size == 0:
        return None
    near = np.hypot(xs + part / 2 - cx, ys + part / 2 - cy) <= 0.6 * r
    if near.any():
        ys, xs = ys[near], xs[near]
    j = rng.integers(ys.size)
    return int(xs[j]), int(ys[j])


def render_sample(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Draw one image.

    Returns ``image`` (S, S, 3) uint8, ``mask`` (S, S) uint8 (0 background, 1..C, 255 ignore) and
    one dict per object (class 1..C, geometry, emblem box, visible pixel counts).
    """
    size, C = cfg.image_size, cfg.num_classes
    image = _background(rng, size)
    owner = np.full((size, size), -1, np.int16)
    objects: list[dict] = []
    part_masks: list[np.ndarray | None] = []
    n_obj = int(rng.integers(cfg.objects_per_image[0], cfg.objects_per_image[1] + 1))
    for j in range(n_obj):
        c = int(rng.integers(C))
        r = float(rng.uniform(cfg.object_radius[0], cfg.object_radius[1]))
        for _ in range(20):  # keep centres apart so that later objects rarely swallow earlier ones
            cx, cy = rng.uniform(0.5 * r, size - 0.5 * r, 2)
            if all(np.hypot(cx - o["cx"], cy - o["cy"]) >= 0.9 * max(r, o["radius"]) for o in objects):
                break
        box, inside, rho = _blob(rng, cfg, cx, cy, r, size)
        angle = class_angle(c, C, cfg.stripe_angles) + np.deg2rad(rng.normal(0.0, cfg.stripe_jitter_deg))
        phase = rng.uniform(0, 2 * np.pi)
        ys = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None] + 0.5
        xs = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :] + 0.5
        stripes = np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / cfg.stripe_period + phase)
        if cfg.stripe_fade > 0:  # weaker stripes towards the outline: class evidence fades out
            stripes = stripes * (1.0 - cfg.stripe_fade * np.clip(rho, 0.0, 1.0))
        body = class_colour(c, C, cfg.body_saturation, rng.uniform(0.5, 0.7))
        pix = body[None, None, :] * (1.0 + cfg.stripe_amplitude * stripes)[..., None]
        image[box][inside] = pix[inside]
        owner[box][inside] = j
        hidden = bool(rng.random() < cfg.part_hidden_prob)
        pos = None if hidden else _place_part(rng, inside, cx - box[1].start, cy - box[0].start, r, cfg.part_size)
        pmask = None
        if pos is not None:
            px, py = pos[0] + box[1].start, pos[1] + box[0].start
            pmask = np.zeros((size, size), bool)
            pmask[py:py + cfg.part_size, px:px + cfg.part_size] = True
            image[pmask] = class_colour(c, C, 1.0, 1.0)
            pos = (px, py)
        part_masks.append(pmask)
        objects.append(dict(cls=c + 1, cx=float(cx), cy=float(cy), radius=r, angle_deg=float(np.rad2deg(angle)),
                            part_x0=-1 if pos is None else pos[0], part_y0=-1 if pos is None else pos[1],
                            part_hidden=int(hidden)))
    image += cfg.noise_std * rng.standard_normal(image.shape, dtype=np.float32)
    image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    mask = np.zeros((size, size), np.uint8)
    for j, obj in enumerate(objects):
        vis = owner == j
        obj["visible_px"] = int(vis.sum())
        obj["part_visible_px"] = 0 if part_masks[j] is None else int((part_masks[j] & vis).sum())
        mask[vis] = obj["cls"] if obj["visible_px"] >= cfg.min_visible_px else 255
    if cfg.ignore_band > 0:
        k = 2 * cfg.ignore_band + 1
        edge = ndimage.grey_dilation(mask, size=k) != ndimage.grey_erosion(mask, size=k)
        mask[edge] = 255
    return image, mask, objects


def image_labels(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) uint8 multi-hot: the classes 1..C present in ``mask``."""
    present = np.zeros(num_classes + 1, np.uint8)
    present[np.unique(mask[mask <= num_classes])] = 1
    return present[1:]


# ---------------------------------------------------------------- writing


def _sample_rng(seed: int, split: str, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLITS.index(split), i])


def _write_chunk(root: str, cfg: SyntheticConfig, split: str, start: int, stop: int):
    """Render and write images ``start..stop-1`` of ``split``; returns (ids, labels, object rows)."""
    ids, labels, rows = [], [], []
    for i in range(start, stop):
        image_id = f"{split}_{i:05d}"
        image, mask, objects = render_sample(_sample_rng(cfg.seed, split, i), cfg)
        _save_image(Path(root) / "JPEGImages" / f"{image_id}.{cfg.image_format}", image)
        _save_mask(Path(root) / "SegmentationClass" / f"{image_id}.png", mask)
        ids.append(image_id)
        labels.append(image_labels(mask, cfg.num_classes))
        for j, o in enumerate(objects):
            rows.append([image_id, j, o["cls"], f"{o['cx']:.2f}", f"{o['cy']:.2f}", f"{o['radius']:.2f}",
                         f"{o['angle_deg']:.1f}", o["part_x0"], o["part_y0"], o["part_hidden"], o["visible_px"],
                         o["part_visible_px"]])
    return ids, labels, rows


# Images and masks are written straight into the temporary folder, without caee.core.io.atomic_write:
# the folder as a whole is the atomic unit (renamed into place when complete, after one os.sync()
# and with the marker written last), and a per-file fsync would make generation ~8x slower.

def _save_image(path: Path, image: np.ndarray) -> None:
    if path.suffix == ".jpg":
        Image.fromarray(image).save(path, format="JPEG", quality=95, subsampling=0)
    else:
        Image.fromarray(image).save(path, format="PNG")


def _save_mask(path: Path, mask: np.ndarray) -> None:
    img = Image.fromarray(mask, mode="P")
    img.putpalette(_PALETTE)
    img.save(path, format="PNG")


def _check_config(cfg: SyntheticConfig) -> None:
    def bad(key: str, why: str) -> CaeeError:
        return CaeeError(f"config key 'data.synthetic.{key}' {why}")

    for key in ("objects_per_image", "object_radius", "object_aspect"):
        lo_hi = getattr(cfg, key)
        if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1] or lo_hi[0] < 0:
            raise bad(key, f"must be [low, high] with 0 <= low <= high, got {lo_hi}")
    if cfg.num_classes < 1 or cfg.num_classes > 254:
        raise bad("num_classes", f"must lie in 1..254, got {cfg.num_classes}")
    if cfg.image_format not in ("jpg", "png"):
        raise bad("image_format", f"must be 'jpg' or 'png', got {cfg.image_format!r}")
    if cfg.image_size < 8 or cfg.num_train < 0 or cfg.num_val < 0:
        raise bad("image_size", "must be >= 8 (and num_train / num_val >= 0)")


def config_signature(cfg: SyntheticConfig) -> dict:
    """What the completion marker records (JSON-normalised), compared on every later use."""
    return json.loads(json.dumps({"format_version": FORMAT_VERSION, **dataclasses.asdict(cfg)}))


def _preview(root: Path, ids: list[str], fmt: str) -> None:
    """Contact sheet: up to 8 images on top, their colour-coded masks below, at 2x."""
    tiles = []
    for image_id in ids[:8]:
        img = np.array(Image.open(root / "JPEGImages" / f"{image_id}.{fmt}").convert("RGB"))
        lbl = Image.open(root / "SegmentationClass" / f"{image_id}.png")
        tiles.append((img, np.array(lbl.convert("RGB"))))
    if not tiles:
        return
    sheet = np.concatenate([np.concatenate([t[0] for t in tiles], 1), np.concatenate([t[1] for t in tiles], 1)], 0)
    sheet = sheet.repeat(2, 0).repeat(2, 1)
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, format="PNG")
    with atomic_write(root / "preview.png") as f:
        f.write(buf.getvalue())


def generate_synthetic(root: str | os.PathLike, syn_cfg: SyntheticConfig, workers: int | None = None,
                       overwrite: bool = False) -> Path:
    """Generate the synthetic dataset into ``root`` (see the module docstring for the layout).

    Everything is written into a temporary sibling folder that is renamed to ``root`` only when
    complete, so an interrupted run never leaves a folder that looks finished. ``workers``:
    processes used for drawing (None: up to 4, by the core count; 0 or 1: this process).
    ``root`` must not exist unless ``overwrite``. Use :func:`ensure_synthetic` to generate on
    demand with locking.
    """
    _check_config(syn_cfg)
    root = Path(root)
    if root.exists() and not overwrite:
        raise CaeeError(f"{root} already exists; delete it (or pass overwrite) to regenerate the synthetic data")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        _generate_into(tmp, syn_cfg, workers)
        if root.exists():
            shutil.rmtree(root)
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _generate_into(out: Path, cfg: SyntheticConfig, workers: int | None) -> None:
    for d in ("JPEGImages", "SegmentationClass", SPLIT_DIR):
        (out / d).mkdir(parents=True, exist_ok=True)
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    counts = {"train": cfg.num_train, "val": cfg.num_val}
    jobs = [(split, s, min(s + 250, n)) for split, n in counts.items() for s in range(0, n, 250)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        # fork: no re-import of the caller's __main__; drawing is numpy only, so no thread-state hazards
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            results = list(ex.map(_write_chunk, *zip(*[(str(out), cfg, *job) for job in jobs])))
    else:
        results = [_write_chunk(str(out), cfg, *job) for job in jobs]

    all_ids, all_labels, rows, per_split = [], [], [], {s: [] for s in _SPLITS}
    for (split, _, _), (ids, labels, obj_rows) in zip(jobs, results):
        per_split[split] += ids
        all_ids += ids
        all_labels += labels
        rows += obj_rows
    for split in _SPLITS:
        write_text(out / SPLIT_DIR / f"{split}.txt", "".join(f"{i}\n" for i in per_split[split]))
    names = synthetic_class_names(cfg.num_classes)
    write_text(out / "class_names.txt", "".join(f"{n}\n" for n in names))
    labels = np.stack(all_labels) if all_labels else np.zeros((0, cfg.num_classes), np.uint8)
    save_labels_cache(out / LABELS_CACHE, all_ids, labels)
    write_text(out / "objects.csv", ",".join(_OBJECT_FIELDS) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    try:
        os.symlink("SegmentationClass", out / "SegmentationClassAug", target_is_directory=True)
    except OSError:  # filesystems without symlinks: a copy
        shutil.copytree(out / "SegmentationClass", out / "SegmentationClassAug")
    _preview(out, per_split["train"], cfg.image_format)
    if hasattr(os, "sync"):
        os.sync()  # every file on disk before the marker says the folder is complete
    marker = {**config_signature(cfg), "images": {s: len(per_split[s]) for s in _SPLITS}}
    write_text(out / MARKER, json.dumps(marker, indent=2) + "\n")


def ensure_synthetic(root: str | os.PathLike, syn_cfg: SyntheticConfig) -> None:
    """Generate the synthetic data into ``root`` unless a complete copy with the same settings is there.

    Safe when several processes (torchrun ranks) call it at once: a file lock next to ``root``
    lets one generate while the others wait, then they all find the completion marker.
    """
    from filelock import FileLock  # a dependency of torch

    root = Path(root)
    make_folder(root.parent)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        marker = root / MARKER
        if marker.is_file():
            _check_marker(marker, syn_cfg)
            return
        if root.exists():
            if not root.is_dir():
                raise CaeeError(f"data.root = {root} is a file, not a dataset folder; move the file away or point "
                                "data.root elsewhere")
            if not any(root.iterdir()):
                root.rmdir()
            else:
                raise CaeeError(
                    f"data.root = {root} exists but holds no complete synthetic dataset (no {MARKER}: an "
                    "interrupted generation or other data); delete the folder or point data.root elsewhere")
        logger.info("generating the synthetic dataset into %s (%d train + %d val images)", root,
                    syn_cfg.num_train, syn_cfg.num_val)
        generate_synthetic(root, syn_cfg)


def _check_marker(marker: Path, cfg: SyntheticConfig) -> None:
    try:
        stored = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise CaeeError(f"{marker}: unreadable completion marker ({e}); delete {marker.parent} to regenerate") from None
    want = config_signature(cfg)
    # a setting added after the data was made is absent from its marker: the data followed its default
    defaults = config_signature(SyntheticConfig())
    diff = [k for k in want if stored.get(k, defaults[k]) != want[k]]
    if diff:
        shown = ", ".join(f"{k}: {stored.get(k)!r} on disk vs {want[k]!r} in the config" for k in diff[:4])
        raise CaeeError(
            f"data.root = {marker.parent} holds synthetic data made with other settings ({shown}); delete the "
            "folder to regenerate it, or set data.root to a new folder")
