"""AffinityNet's training labels against the ground truth: both label rules on the same CAMs.

For the first N images of a split, the CAMs of a folder go through the la / ha dense CRF and each
rule's cell labels on the whole image (no crop, no flip):

    psa       PSA's rule: la / ha posteriors averaged over each stride x stride cell, argmax
              (caee.method.affinity_labels.cell_table_from_cams, the window at (s*i, s*j))
    top_left  caee's earlier rule: argmax label maps merged per pixel, top-left pixel per cell

and the pairs of PSA's pair set (radius, psa_border) give bg / fg / neg targets. Printed per rule:
the share of cells labelled (not 255), their accuracy against the ground truth at the same
cell, the mean number of pairs per image of each kind and their precision (bg: both ends are
background in the ground truth; fg: both ends are the same class; neg: the ends differ). The
ground truth of a cell is the ground-truth label at its centre pixel (s*i + s//2); 255 there
is left out of the precision.

    python tools/affinity_label_stats.py --config configs/demo.yaml --cam-dir work_dirs/demo/cam_cgnet \
        --stride 2 --images 200
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caee.core.config import load_config  # noqa: E402
from caee.core.io import load_cam_npz, load_image, load_label_png  # noqa: E402
from caee.data import load_split  # noqa: E402
from caee.method.affinity import confident_labels, pair_indices, pair_label_targets  # noqa: E402
from caee.method.affinity_labels import cell_table_from_cams  # noqa: E402
from caee.method.crf import crf_cam_labels  # noqa: E402


def rule_cells(image, keys, cams, gt_shape, la, ha, stride, crf):
    """``{rule: (h, w) uint8}`` cell labels of both rules on the whole image."""
    h, w = gt_shape[0] // stride, gt_shape[1] // stride
    table = cell_table_from_cams(image, keys, cams, la, ha, stride, crf)
    psa = table[stride - 1::stride, stride - 1::stride][:h, :w]
    la_l = torch.from_numpy(crf_cam_labels(image, keys, cams, la, crf))
    ha_l = torch.from_numpy(crf_cam_labels(image, keys, cams, ha, crf))
    top = confident_labels(la_l, ha_l).numpy()[::stride, ::stride][:h, :w]
    return {"psa": psa, "top_left": top}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--cam-dir", required=True)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--split", default="")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    tc = cfg.train_affinity
    index = load_split(cfg.data, a.split or cfg.data.train_split)
    s = a.stride
    stats = {r: dict(cells=0, labelled=0, correct=0, fg_cells=0, **{f"n_{k}": 0 for k in ("bg", "fg", "neg")},
                     **{f"ok_{k}": 0 for k in ("bg", "fg", "neg")}, **{f"gt_{k}": 0 for k in ("bg", "fg", "neg")})
             for r in ("psa", "top_left")}
    n = min(a.images, len(index.ids))
    for i in range(n):
        image_id = index.ids[i]
        image = load_image(index.image_path(i))
        gt = load_label_png(index.mask_path(i))
        keys, cams = load_cam_npz(Path(a.cam_dir) / f"{image_id}.npz", index.num_classes)
        cells = rule_cells(image, keys, cams, gt.shape, tc.la_alpha, tc.ha_alpha, s,
                           cfg.crf)
        gt_c = gt[s // 2::s, s // 2::s][:gt.shape[0] // s, :gt.shape[1] // s]
        hh, ww = gt_c.shape
        fi, ti = pair_indices(hh, ww, tc.radius, tc.psa_border)
        gta, gtb = gt_c.reshape(-1)[fi.numpy()], gt_c.reshape(-1)[ti.numpy()]
        gvalid = (gta < 255) & (gtb < 255)
        g_same = gta == gtb
        gt_kind = {"bg": gvalid & g_same & (gta == 0), "fg": gvalid & g_same & (gta > 0), "neg": gvalid & ~g_same}
        for r, lab in cells.items():
            st = stats[r]
            st["cells"] += lab.size
            lab_ok = (lab < 255) & (gt_c < 255)
            st["labelled"] += int((lab < 255).sum())
            st["correct"] += int((lab_ok & (lab == gt_c)).sum())
            st["fg_cells"] += int(((lab > 0) & (lab < 255)).sum())
            bg, fg, neg = (t[0].numpy() for t in pair_label_targets(torch.from_numpy(lab)[None], fi, ti))
            for k, m in (("bg", bg), ("fg", fg), ("neg", neg)):
                st[f"n_{k}"] += int((m & gvalid).sum())
                st[f"ok_{k}"] += int((m & gt_kind[k]).sum())
                st[f"gt_{k}"] += int(gt_kind[k].sum())
    print(f"{n} images of {index.split}, CAMs {a.cam_dir}, stride {s}, radius {tc.radius}, "
          f"psa_border {tc.psa_border}, la/ha {tc.la_alpha:g}/{tc.ha_alpha:g}")
    print("| rule | cells labelled % | cell accuracy % | fg cells / img | "
          "bg pairs / img (prec %, recall %) | fg pairs / img (prec, recall) | neg pairs / img (prec, recall) |")
    print("|---|---|---|---|---|---|---|")
    for r, st in stats.items():
        row = [r, f"{100 * st['labelled'] / st['cells']:.1f}", f"{100 * st['correct'] / max(st['labelled'], 1):.1f}",
               f"{st['fg_cells'] / n:.1f}"]
        for k in ("bg", "fg", "neg"):
            row.append(f"{st[f'n_{k}'] / n:.0f} ({100 * st[f'ok_{k}'] / max(st[f'n_{k}'], 1):.1f}, "
                       f"{100 * st[f'ok_{k}'] / max(st[f'gt_{k}'], 1):.1f})")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
