#!/usr/bin/env python
"""Stage 5: pseudo labels by random walk of the CAMs with AffinityNet's affinities (PSA).

Input:  data.root (images of pseudo_labels.split, default data.cam_split); the CAMs
        <work_dir>/cam_cgnet/<id>.npz (or pseudo_labels.cam_dir: any CAM folder, OC or CGNet);
        the AffinityNet <work_dir>/train_affinity/model.pth (or pseudo_labels.weights, e.g. PSA's
        res38_aff.pth, whose architecture is then train_affinity.net).
Output: <out_dir>/<id>.png palette label maps (default <work_dir>/pseudo_labels) and
        <out_dir>/DONE once all are written; log.txt and config.yaml in <out_dir> too.
        Existing PNGs are kept unless pseudo_labels.overwrite=true.

    python make_pseudo_labels.py --config configs/voc/r38.yaml data.root=/data/VOC2012
    torchrun --nproc_per_node 4 make_pseudo_labels.py --config configs/voc/r38.yaml
"""
import sys

from caee.cli import run_stage
from caee.stages.make_pseudo_labels import main

if __name__ == "__main__":
    sys.exit(run_stage(main, __doc__))
