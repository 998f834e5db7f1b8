#!/usr/bin/env python
"""Stage 4: train AffinityNet (PSA) on pair labels from the CAMs' low/high-alpha CRF labels.

Input:  data.root (images of data.train_split); the CAMs <work_dir>/cam_cgnet/<id>.npz (or
        train_affinity.cam_dir) and their CRF labels <cam_dir>_crf_<la_alpha>/ and
        <cam_dir>_crf_<ha_alpha>/ (computed from the CAMs and cached there when absent);
        train_affinity.net.pretrained (ImageNet weights) or train_affinity.init (our AffinityNet
        model.pth, PSA's res38_aff.pth, or a classifier model.pth / res38_cls.pth whose backbone
        alone is used).
Output: <work_dir>/train_affinity/{model.pth, last.pth, config.yaml, log.txt, metrics.jsonl}

    python train_affinity.py --config configs/voc/r38.yaml data.root=/data/VOC2012
    torchrun --nproc_per_node 4 train_affinity.py --config configs/voc/r38.yaml
"""
import sys

from caee.cli import run_stage
from caee.stages.train_affinity import main

if __name__ == "__main__":
    sys.exit(run_stage(main, __doc__))
