#!/usr/bin/env python
"""Stage 3: multi-scale + flip CAMs of the CGNet (cam.source=cgnet) or the OC (cam.source=classifier).

Input:  data.root (images + image-level labels of cam.split, default data.cam_split);
        cam.weights (default <work_dir>/train_<cam.source>/model.pth, or a PSA-format .pth).
Output: <out_dir>/<id>.npz   keys (K,) int64 0-based classes of the image, cams (K, H, W) float16 in [0, 1]
        <out_dir>/{config.yaml, log.txt, DONE}       (out_dir = cam.out_dir, default <work_dir>/cam_<cam.source>)
        <out_dir>_crf_<alpha>/<id>.png               dense-CRF labels for each alpha in cam.crf_alphas
        <out_dir>_pictures/<id>.png                  image | GT | CAMs of the first cam.pictures images
Existing files are skipped unless cam.overwrite=true; DONE is written when every rank has finished.

    python make_cam.py --config configs/voc/r38.yaml cam.crf_alphas=[4,24]
    torchrun --nproc_per_node 4 make_cam.py --config configs/voc/r38.yaml cam.source=classifier
"""
import sys

from caee.cli import run_stage
from caee.stages.make_cam import main

if __name__ == "__main__":
    sys.exit(run_stage(main, __doc__))
