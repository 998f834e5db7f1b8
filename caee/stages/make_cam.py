"""Stage 3: multi-scale + flip CAMs of the CGNet (cam.source=cgnet) or the OC (cam.source=classifier).

Input:  data.root (images + image-level labels of cam.split, default data.cam_split);
        cam.weights (default <work_dir>/train_<cam.source>/model.pth, or a PSA-format .pth).
Output: <out_dir>/<id>.npz   keys (K,) int64 0-based classes of the image, cams (K, H, W) float16 in [0, 1]
        <out_dir>/{config.yaml, log.txt, record.json}       (out_dir = cam.out_dir, default <work_dir>/cam_<cam.source>)
        <out_dir>_crf_<alpha>/<id>.png               dense-CRF labels for each alpha in cam.crf_alphas
        <out_dir>_pictures/<id>.png                  image | GT | CAMs of the first cam.pictures images
Existing files are skipped unless cam.overwrite=true; record.json says which splits are complete.

    caee make-cam --config configs/voc/r38.yaml 'cam.crf_alphas=[4,24]'
    torchrun --nproc_per_node 4 -m caee make-cam --config configs/voc/r38.yaml cam.source=classifier

An interrupted run resumes where it stopped. A re-run with other settings is refused before
anything is written, unless cam.overwrite.
Under torchrun every rank does the images ``ids[rank::world]``; nothing is gathered.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from caee.core import distributed, records
from caee.method.cam import image_keys, multiscale_cams
from caee.core.config import Config, CrfConfig, save_config, expand_work_dir
from caee.method.crf import crf_cam_labels, label_folder_settings
from caee.data import InferenceDataset, SplitIndex, collate_list, ensure_dataset, load_split
from caee.core.errors import CaeeError, not_found
from caee.core.logs import show_progress
from caee.core.io import load_cam_npz, load_image, load_label_png, save_cam_npz, save_label_png
from caee.models.classifier import load_classifier
from caee.core.parallel import ThreadWriter, run_pool, workers_for
from caee.core.pictures import cam_grid, save_picture
from caee.core.layout import Layout, crf_dir, pictures_dir
from caee.core.io import claim_folder
from caee.stages.common import open_output, stage_settings
from caee.stages.setup import start_stage

logger = logging.getLogger(__name__)

@dataclasses.dataclass
class MakeCamResult:
    out_dir: Path
    num_images: int        # this rank's share of the split
    computed: int          # CAMs computed in this run (the others existed)
    seconds: float
    images_per_s: float    # computed CAMs per second (forward + saving)




def open_folders(cfg: Config, out_dir: Path) -> dict:
    """Open the records of the CAM folder and of each CRF label folder (rank 0, before config.yaml or
    the log change): resumed, refused (other settings) or started over (cam.overwrite). A CRF
    folder records the CAM folder's run, the CRF settings and alpha, as AffinityNet's label cache
    does. Returns the CAM folder's record."""
    record = open_output(out_dir, "make_cam", stage_settings(cfg, "make_cam"), cfg.cam.overwrite, "*.npz")
    for alpha in cfg.cam.crf_alphas:
        folder = crf_dir(out_dir, alpha)
        claim_folder(folder, main=distributed.is_main())
        open_output(folder, "make_cam", label_folder_settings(record["run"], alpha, cfg.crf), cfg.cam.overwrite,
                    "*.png")
    return record


# ---------------------------------------------------------------- CAMs


def compute_cams(model: torch.nn.Module, index: SplitIndex, todo: list[int], out_dir: Path, cfg: Config,
                 device: torch.device) -> None:
    """Write ``<out_dir>/<id>.npz`` for the images ``todo`` of ``index``."""
    cc = cfg.cam
    loader = DataLoader(Subset(InferenceDataset(index), todo), batch_size=cc.batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers, collate_fn=collate_list,
                        pin_memory=device.type == "cuda")
    saver = ThreadWriter()
    bar = tqdm(total=len(todo), desc=f"CAMs {out_dir.name}", unit="img", dynamic_ncols=True,
               disable=not show_progress())
    try:
        for batch in loader:
            keys = [image_keys(s["label"]) for s in batch]
            cams = multiscale_cams(model, [s["image"] for s in batch], keys, cc.scales, cc.flip, device, cc.amp,
                                   cc.resize)
            for s, k, c in zip(batch, keys, cams):
                saver.submit(save_cam_npz, out_dir / f"{s['id']}.npz", k, c.astype(cc.dtype))
            bar.update(len(batch))
    finally:
        bar.close()
        saver.close()


# ---------------------------------------------------------------- CRF labels and pictures


@dataclasses.dataclass
class _PostJob:
    """CPU work after the CAMs: CRF label maps and pictures (run in a process pool)."""
    index: SplitIndex
    out_dir: Path
    alphas: list[float]
    params: CrfConfig
    picture_ids: set[int]
    recomputed: set[int]   # images whose CAM changed in this run: their outputs are redone
    overwrite: bool

    def outputs(self, i: int) -> list[tuple[str, object, Path]]:
        image_id = self.index.ids[i]
        out: list[tuple[str, object, Path]] = [("crf", a, crf_dir(self.out_dir, a) / f"{image_id}.png")
                                               for a in self.alphas]
        if i in self.picture_ids:
            out.append(("picture", None, pictures_dir(self.out_dir) / f"{image_id}.png"))
        return out

    def todo(self, i: int) -> list[tuple[str, object, Path]]:
        redo = self.overwrite or i in self.recomputed
        return [o for o in self.outputs(i) if redo or not o[2].exists()]

    def __call__(self, i: int) -> None:
        image_id = self.index.ids[i]
        keys, cams = load_cam_npz(self.out_dir / f"{image_id}.npz", self.index.num_classes)
        image = load_image(self.index.image_path(i))
        if image.shape[:2] != cams.shape[1:]:
            raise CaeeError(f"{self.out_dir / image_id}.npz: CAMs are {cams.shape[2]}x{cams.shape[1]} but the image "
                            f"is {image.shape[1]}x{image.shape[0]}; re-run with cam.overwrite=true")
        for what, alpha, path in self.todo(i):
            if what == "crf":
                save_label_png(path, crf_cam_labels(image, keys, cams, float(alpha), self.params))
            else:
                save_picture(path, cam_grid(image, self._ground_truth(i), keys, cams, self.index.class_names))

    def _ground_truth(self, i: int) -> np.ndarray | None:
        for path in (self.index.eval_mask_path(i), self.index.mask_path(i)):
            if path is not None and path.is_file():
                return load_label_png(path)
        return None


def run_post(job: _PostJob, items: list[int], workers: int) -> None:
    """Run ``job`` on ``items`` in a process pool, in slices so that the progress bar moves."""
    if not items:
        return
    step = max(1, workers * 8)
    with tqdm(total=len(items), desc=f"CRF/pictures {job.out_dir.name}", unit="img", dynamic_ncols=True,
              disable=not show_progress()) as bar:
        for start in range(0, len(items), step):
            chunk = items[start:start + step]
            run_pool(job, chunk, workers=workers)
            bar.update(len(chunk))


# ---------------------------------------------------------------- the stage


def main(cfg: Config) -> MakeCamResult:
    cfg = expand_work_dir(cfg)
    cc = cfg.cam
    out_dir = Layout(cfg).cam_dir()
    # CAMs or CRF labels made with other settings are refused before config.yaml / log.txt change
    t_start = time.perf_counter()
    opened: dict = {}
    env = start_stage(cfg, out_dir.name, out_dir=out_dir, before_write=lambda d: opened.update(open_folders(cfg, d)))
    if distributed.is_main():
        for alpha in cc.crf_alphas:
            save_config(cfg, crf_dir(out_dir, alpha))
    ensure_dataset(cfg.data)
    split = cc.split or cfg.data.cam_split
    index = load_split(cfg.data, split)
    mine = distributed.shard(list(range(len(index))))
    todo = [i for i in mine if cc.overwrite or not (out_dir / f"{index.ids[i]}.npz").exists()]
    logger.info("CAMs of the %s on split %s: %d images (%d on this rank, %d to compute), scales %s, flip %s, "
                "device %s -> %s", cc.source, split, len(index), len(mine), len(todo), cc.scales, cc.flip,
                env.device, out_dir)

    t0 = time.perf_counter()
    if todo:
        weights = Layout(cfg).cam_weights()
        if not weights.is_file():
            raise CaeeError(f"{cc.source} weights {not_found(weights)}; run train_{cc.source}.py first or set "
                            "cam.weights")
        net = cfg.train_cgnet.net if cc.source == "cgnet" else cfg.train_classifier.net
        model = load_classifier(weights, net, index.num_classes).to(env.device).eval()
        if env.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        compute_cams(model, index, todo, out_dir, cfg, env.device)
        del model  # the CRF pool below forks this process
    seconds = time.perf_counter() - t0

    picture_ids = set(range(min(cc.pictures, len(index))))
    job = _PostJob(index, out_dir, list(cc.crf_alphas), cfg.crf, picture_ids, set(todo), cc.overwrite)
    run_post(job, [i for i in mine if job.todo(i)], workers_for(cfg.crf.workers))

    distributed.barrier()
    ips = len(todo) / seconds if todo and seconds > 0 else 0.0
    if distributed.is_main():  # the records' last writes: the CRF folders first, then the CAMs they come from
        wall = time.perf_counter() - t_start
        for alpha in cc.crf_alphas:
            records.finish(crf_dir(out_dir, alpha), records.read(crf_dir(out_dir, alpha)), split, wall, None)
        records.finish(out_dir, opened, split, wall, ips if todo else None)
    logger.info("%s: %d CAMs computed (%.2f images/s), %d kept; complete", out_dir, len(todo), ips,
                len(mine) - len(todo))
    return MakeCamResult(out_dir, len(mine), len(todo), seconds, ips)
