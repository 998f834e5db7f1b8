#!/usr/bin/env python
"""Stage 2: train the CGNet with class-specific adversarial erasing against the frozen OC.

Input:  data.root; the OC from <work_dir>/train_classifier/model.pth or train_cgnet.oc_weights
        (our model.pth or PSA's res38_cls.pth / OC-CSE's od_cam.pth); train_cgnet.net.pretrained.
Output: <work_dir>/train_cgnet/{model.pth, last.pth, config.yaml, log.txt, metrics.jsonl}

    python train_cgnet.py --config configs/voc/r38.yaml data.root=/data/VOC2012
    python train_cgnet.py --config configs/demo.yaml masking.depth=3   # feature-level masking
"""
import sys

from caee.cli import run_stage
from caee.stages.train_cgnet import main

if __name__ == "__main__":
    sys.exit(run_stage(main, __doc__))
