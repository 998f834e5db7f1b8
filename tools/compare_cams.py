#!/usr/bin/env python
"""Side-by-side CAMs of two folders (supplementary Fig. III): image | GT | CAM of A | CAM of B.

Each CAM column shows the maximum over the image's classes as a jet overlay. Images are the first
--n of the split (cam.split, default data.cam_split) that have CAMs in both folders.

    python tools/compare_cams.py --config configs/synthetic.yaml \
        --a work_dirs/demo/cam_classifier --b work_dirs/demo/cam_cgnet --out compare.png --n 8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from caee.core.config import load_config
from caee.data import ensure_dataset, load_split
from caee.core.errors import CaeeError
from caee.core.io import load_cam_npz, load_image, load_label_png
from caee.core.pictures import compare_cams, save_picture


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", required=True, help="experiment YAML (for data.root and the split)")
    ap.add_argument("--a", required=True, help="CAM folder of the first CAM column (e.g. the OC's)")
    ap.add_argument("--b", required=True, help="CAM folder of the second CAM column (e.g. the CGNet's)")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--n", type=int, default=8, help="number of images (rows)")
    ap.add_argument("--split", default="", help="split (default cam.split or data.cam_split)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        ensure_dataset(cfg.data)
        index = load_split(cfg.data, args.split or cfg.cam.split or cfg.data.cam_split)
        a, b = Path(args.a), Path(args.b)
        rows = []
        for i, image_id in enumerate(index.ids):
            if len(rows) == args.n:
                break
            pa, pb = a / f"{image_id}.npz", b / f"{image_id}.npz"
            if not (pa.is_file() and pb.is_file()):
                continue
            gt_path = index.eval_mask_path(i)
            gt = load_label_png(gt_path) if gt_path is not None and gt_path.is_file() else None
            rows.append((load_image(index.image_path(i)), gt, load_cam_npz(pa)[1], load_cam_npz(pb)[1]))
        if not rows:
            raise CaeeError(f"no image of the split has CAMs in both {a} and {b}")
        save_picture(args.out, compare_cams(rows, titles=("image", "ground truth", a.name, b.name)))
    except CaeeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(rows)} images -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
