"""Where a CAM / label folder's errors are: near object boundaries or inside, and of which kind.

For the first N images of a split, each pixel with a ground-truth label (not 255) is counted as
correct or as one of: ``missed`` (object labelled background), ``spill`` (background labelled
object), ``confused`` (object labelled another class), each split into pixels within ``--band`` px
of a ground-truth boundary and pixels farther inside. CAMs (``.npz``) are labelled at
``--threshold``. The shares are of all labelled pixels, in %.

    python tools/error_breakdown.py --config configs/demo.yaml work_dirs/demo/cam_cgnet --threshold 0.3
    python tools/error_breakdown.py --config configs/demo.yaml work_dirs/demo/pseudo_labels
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caee.core.config import load_config  # noqa: E402
from caee.core.io import load_cam_npz, load_label_png  # noqa: E402
from caee.core.metrics import cam_to_label  # noqa: E402
from caee.data import load_split  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--config", required=True)
    p.add_argument("--threshold", type=float, default=0.25)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--band", type=int, default=2)
    p.add_argument("--split", default="")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=...")
    a = p.parse_intermixed_args(argv)
    cfg = load_config(a.config, a.overrides)
    index = load_split(cfg.data, a.split or cfg.data.cam_split)
    folder = Path(a.folder)
    counts = {k: 0 for k in ("total", "near", "missed_near", "missed_in", "spill_near", "spill_in",
                             "confused_near", "confused_in")}
    n = min(a.images, len(index.ids))
    k = 2 * a.band + 1
    for i in range(n):
        image_id = index.ids[i]
        gt = load_label_png(index.mask_path(i))
        npz = folder / f"{image_id}.npz"
        if npz.is_file():
            keys, cams = load_cam_npz(npz, index.num_classes)
            pred = cam_to_label(keys, cams, a.threshold)
        else:
            pred = load_label_png(folder / f"{image_id}.png")
        valid = gt < 255
        near = (ndimage.grey_dilation(gt, size=k) != ndimage.grey_erosion(gt, size=k)) & valid
        counts["total"] += int(valid.sum())
        counts["near"] += int(near.sum())
        kinds = {"missed": (gt > 0) & (pred == 0), "spill": (gt == 0) & (pred > 0),
                 "confused": (gt > 0) & (pred > 0) & (pred != gt)}
        for name, m in kinds.items():
            m = m & valid
            counts[f"{name}_near"] += int((m & near).sum())
            counts[f"{name}_in"] += int((m & ~near).sum())
    t = counts["total"]
    print(f"{folder} ({n} images of {index.split}; band {a.band} px = {100 * counts['near'] / t:.1f} % of pixels)")
    print("| error | near boundary % | inside % |")
    print("|---|---|---|")
    for name in ("missed", "spill", "confused"):
        print(f"| {name} | {100 * counts[f'{name}_near'] / t:.2f} | {100 * counts[f'{name}_in'] / t:.2f} |")


if __name__ == "__main__":
    main()
