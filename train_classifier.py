#!/usr/bin/env python
"""Stage 1: train the ordinary classifier (OC) on image-level labels.

Input:  data.root (images + image-level labels of data.train_split); train_classifier.net.pretrained
        (ImageNet weights: MXNet .params or .pth) or train_classifier.init (a PSA/caee checkpoint).
Output: <work_dir>/train_classifier/{model.pth, last.pth, config.yaml, log.txt, metrics.jsonl}

    python train_classifier.py --config configs/voc/r38.yaml data.root=/data/VOC2012
    torchrun --nproc_per_node 4 train_classifier.py --config configs/voc/r38.yaml
"""
import sys

from caee.cli import run_stage
from caee.stages.train_classifier import main

if __name__ == "__main__":
    sys.exit(run_stage(main, __doc__))
