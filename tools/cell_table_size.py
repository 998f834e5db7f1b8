"""Disk size of AffinityNet's cell label tables (train_affinity.label_rule=psa) at VOC image size.

VOC is not needed: synthetic 500 x 375 scenes with 1-2 objects of 20 classes, CAMs made from the
objects' masks (blurred, peak 1, noisy), the la / ha CRF as train_affinity runs it, the tables
written as train_affinity writes them. Prints the mean PNG size and the totals for VOC train_aug
(10,582 images), next to the uncompressed table and PSA's float32 posteriors (npy dicts).

    python tools/cell_table_size.py [--images 20] [--stride 8]
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from caee.method.affinity_labels import cell_table_from_cams
from caee.core.config import SyntheticConfig
from caee.core.config import CrfConfig
from caee.data.synthetic import render_sample
from caee.core.io import save_label_png

VOC_TRAIN_AUG = 10582
H, W = 375, 500


def scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """image (H, W, 3) uint8, keys (K,), cams (K, H, W) float32 in [0, 1]."""
    cfg = dataclasses.replace(SyntheticConfig(), image_size=W, num_classes=20, objects_per_image=[1, 2],
                              object_radius=[60, 130], part_size=30, stripe_period=20.0)
    image, mask, _ = render_sample(rng, cfg)
    image, mask = image[:H], mask[:H]
    keys = np.array(sorted(set(np.unique(mask).tolist()) - {0, 255}), np.int64)
    cams = []
    for c in keys:
        cam = ndimage.gaussian_filter((mask == c).astype(np.float32), 12) + rng.normal(0, 0.03, mask.shape)
        cams.append(np.clip(cam / max(cam.max(), 1e-6), 0, 1))
    return image, keys - 1, np.asarray(cams, np.float32).reshape(len(keys), H, W)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--stride", type=int, default=8)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    sizes, channels = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.images):
            image, keys, cams = scene(rng)
            path = Path(tmp) / f"{i}.png"
            save_label_png(path, cell_table_from_cams(image, keys, cams, 4, 24, args.stride, CrfConfig()))
            sizes.append(path.stat().st_size)
            channels.append(1 + len(keys))
    mean = float(np.mean(sizes))
    table = (H + args.stride - 1) * (W + args.stride - 1)
    print(f"{args.images} scenes {W}x{H}, {np.mean(channels) - 1:.2f} classes each: cell table PNG mean "
          f"{mean / 1024:.1f} KiB (min {min(sizes) / 1024:.1f}, max {max(sizes) / 1024:.1f})")
    print(f"VOC train_aug ({VOC_TRAIN_AUG} images): {VOC_TRAIN_AUG * mean / 2**20:.0f} MiB as PNG; "
          f"uncompressed tables {VOC_TRAIN_AUG * table / 2**30:.2f} GiB; "
          f"float32 la + ha posteriors with 2.5 channels {VOC_TRAIN_AUG * 2 * 2.5 * H * W * 4 / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
