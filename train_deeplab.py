#!/usr/bin/env python
"""Stage 6: train DeepLab (LargeFOV / ASPP) on the pseudo labels, then segment and evaluate.

Input:  data.root (images of train_deeplab.split, "" = pseudo_labels.split or data.cam_split;
        images and ground truth of train_deeplab.eval_split, "" = data.val_split);
        train_deeplab.label_dir ("" = <work_dir>/pseudo_labels, or pseudo_labels.out_dir): one
        <id>.png label map per training image (0 = background, 1..C, 255 = ignore), checked first;
        train_deeplab.net.pretrained (ImageNet weights) or train_deeplab.init (a checkpoint).
Output: <work_dir>/train_deeplab/
          model.pth, last.pth, config.yaml, log.txt, metrics.jsonl, label_histogram.json
          pred_<split>/<id>.png          predictions (VOC palette)
          pred_<split>_crf/<id>.png      with train_deeplab.test_crf=true
          results_<split>.json           mIoU / per-class IoU; scales, flip, CRF, init, label source

    python train_deeplab.py --config configs/voc/r38.yaml
    torchrun --nproc_per_node 4 train_deeplab.py --config configs/voc/r38.yaml
    # re-evaluate a trained model.pth with other test settings (no training):
    python train_deeplab.py --config configs/voc/r38.yaml train_deeplab.eval_only=true \
        "train_deeplab.test_scales=[0.5,0.75,1,1.25,1.5]" train_deeplab.test_flip=true train_deeplab.test_crf=true
"""
import sys

from caee.cli import run_stage
from caee.stages.train_deeplab import main

if __name__ == "__main__":
    sys.exit(run_stage(main, __doc__))
