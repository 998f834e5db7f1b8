#!/usr/bin/env python
"""The whole VOC recipe's time, extrapolated from a few timed steps / images of every stage.

Each stage runs the library's own step on VOC-sized synthetic inputs (500 x 375 images, 20
classes, random weights: the cost does not depend on them) for ``--steps`` timed units after one
warm-up, and its time per image is multiplied by the recipe's image count:

    stage                  unit             recipe (counts from --config, default configs/voc/r38.yaml)
    train_classifier (OC)  training image   epochs x 10,582 train_aug images, its batch and crop
    train_cgnet            training image   epochs x 10,582
    make_cam (MSF)         image            10,582 x (scales x flip) passes
    crf (affinity labels)  image            10,582 x 2 alphas (la / ha), over the cores (process pool)
    train_affinity         training image   epochs x 10,582
    make_pseudo_labels     image            10,582 (embeddings + random walk + labels)
    train_deeplab          training image   epochs x 10,582
    infer_val              image            1,449 val images (test scales + flip)

Training stages are timed at ``min(batch, --max-batch)`` images per step and ``min(crop,
--max-crop)`` and extrapolated per image, so small settings give a rough, lower-bound-ish figure.
Numbers are for the device given (bf16 autocast and channels_last on CUDA as the engine runs).

    python bench/bench_pipeline.py --device cuda --steps 5                   # the GPU estimate
    python bench/bench_pipeline.py --width 0.0625 --image 40x30 --max-batch 1 --max-crop 32 --steps 1 \\
        --train-images 100 --val-images 10                                    # seconds (tests)
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from caee.core.config import Config, NetConfig, load_config  # noqa: E402
from caee.engine.trainer import StepContext, build_optimizer, parameter_groups  # noqa: E402

NUM_CLASSES = 20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls after one warm-up call."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


class Bench:
    def __init__(self, cfg: Config, args):
        self.cfg, self.args = cfg, args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.h, self.w = args.image
        self.rng = np.random.default_rng(0)
        self.keys = np.array([3, 14])

    # ------------------------------------------------------------ helpers

    def net(self, dropout: float = 0.0) -> NetConfig:
        return NetConfig(backbone="resnet38", width=self.args.width, dropout=dropout)

    def _shape(self, tc) -> tuple[int, int]:
        return min(tc.batch_size, self.args.max_batch), min(tc.crop_size, self.args.max_crop)

    def _train(self, task, tc, batch: dict) -> float:
        """Seconds per training image of ``task`` on ``batch`` with the engine's optimiser."""
        model = task.model.to(self.device).train()
        opt = build_optimizer(parameter_groups(model, task.head_modules(), tc), tc)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (self.cuda and tc.amp) else nullcontext()
        channels_last = self.cuda and tc.channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        ctx = StepContext(self.device, 0, 0, 10 ** 6, 0, channels_last)

        def step():
            with autocast:
                loss, _ = task.train_step(model, batch, ctx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        n = len(next(iter(batch.values())))
        return _timed(step, self.args.steps, self.device) / n

    def _cls_batch(self, tc) -> dict:
        b, crop = self._shape(tc)
        labels = torch.zeros(b, NUM_CLASSES)
        labels[:, self.keys] = 1
        return {"image": torch.randn(b, 3, crop, crop), "label": labels}

    def image(self) -> np.ndarray:
        return self.rng.integers(0, 256, (self.h, self.w, 3), dtype=np.uint8)

    def cams(self) -> np.ndarray:
        return self.rng.random((len(self.keys), self.h, self.w), dtype=np.float32)

    # ------------------------------------------------------------ stages: seconds per image

    def train_classifier(self) -> float:
        from caee.models.classifier import build_classifier
        from caee.stages.train_classifier import ClassifierTask

        tc = self.cfg.train_classifier
        task = ClassifierTask(build_classifier(self.net(0.5), NUM_CLASSES), self.net(0.5), ["c"] * NUM_CLASSES)
        task.model.backbone.freeze()
        return self._train(task, tc, self._cls_batch(tc))

    def train_cgnet(self) -> float:
        from caee.models.classifier import build_classifier
        from caee.stages.train_cgnet import CGNetTask, freeze_module

        tc = self.cfg.train_cgnet
        oc = freeze_module(build_classifier(self.net(0.5), NUM_CLASSES)).to(self.device)
        if self.cuda and tc.channels_last:
            oc = oc.to(memory_format=torch.channels_last)
        cgnet = build_classifier(self.net(0.0), NUM_CLASSES)
        cgnet.backbone.freeze()
        task = CGNetTask(cgnet, oc, self.cfg, ["c"] * NUM_CLASSES)
        return self._train(task, tc, self._cls_batch(tc))

    def make_cam(self) -> float:
        from caee.method.cam import multiscale_cams
        from caee.models.classifier import build_classifier

        model = build_classifier(self.net(0.0), NUM_CLASSES).eval().to(self.device)
        img = self.image()
        cc = self.cfg.cam
        return _timed(lambda: multiscale_cams(model, [img], [self.keys], cc.scales, cc.flip, self.device, cc.amp),
                      self.args.steps, self.device)

    def crf(self) -> float:
        from caee.method.crf import crf_cam_labels
        from caee.core.parallel import available_cpus

        img, cams = self.image(), self.cams()
        ac = self.cfg.train_affinity
        one = _timed(lambda: [crf_cam_labels(img, self.keys, cams, a) for a in (ac.la_alpha, ac.ha_alpha)],
                     self.args.steps, torch.device("cpu"))
        return one / available_cpus()  # the stage runs the CRFs in a process pool over every core

    def train_affinity(self) -> float:
        from caee.models import ResNet38
        from caee.models.affinitynet import AffinityNet
        from caee.stages.train_affinity import AffinityTask

        tc = self.cfg.train_affinity
        b, crop = self._shape(tc)
        crop = max(crop, 8 * (2 * tc.radius + 2))  # a smaller feature grid has no pair within the radius
        side = crop // 8
        labels = torch.randint(0, 3, (b, side, side), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
        labels[:, :, : side // 4] = 255
        task = AffinityTask(AffinityNet(ResNet38(width=self.args.width)), tc, ["c"] * NUM_CLASSES)
        return self._train(task, tc, {"image": torch.randn(b, 3, crop, crop), "aff_label": labels})

    def make_pseudo_labels(self) -> float:
        from caee.models import ResNet38
        from caee.models.affinitynet import AffinityNet
        from caee.method.pseudo_labels import (PairCache, WalkParams, embed_image, labels_from_scores,
                                                    random_walk_scores)

        model = AffinityNet(ResNet38(width=self.args.width)).eval().to(self.device)
        params = WalkParams()
        pairs = PairCache(params.radius, params.psa_border) if hasattr(params, "psa_border") else None
        img, cams = self.image(), torch.from_numpy(self.cams())

        def one():
            scores = random_walk_scores(embed_image(model, img, 8, self.device), cams, params, 8, pairs)
            labels_from_scores(scores.cpu().numpy(), self.keys)

        return _timed(one, self.args.steps, self.device)

    def train_deeplab(self) -> float:
        from caee.models.deeplab import build_deeplab
        from caee.stages.train_deeplab import segmentation_loss

        tc = self.cfg.train_deeplab
        b, crop = self._shape(tc)
        model = build_deeplab(self.net(0.0), NUM_CLASSES + 1, tc.head).to(self.device).train()
        opt = build_optimizer(parameter_groups(model, model.head_modules(), tc), tc)
        x = torch.randn(b, 3, crop, crop, device=self.device)
        y = torch.randint(0, NUM_CLASSES + 1, (b, crop, crop), device=self.device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (self.cuda and tc.amp) else nullcontext()

        def step():
            with autocast:
                loss, _ = segmentation_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return _timed(step, self.args.steps, self.device) / b

    def infer_val(self) -> float:
        from caee.models.deeplab import build_deeplab
        from caee.method.segment import predict

        model = build_deeplab(self.net(0.0), NUM_CLASSES + 1, self.cfg.train_deeplab.head).to(self.device).eval()
        x = torch.from_numpy(self.image()).permute(2, 0, 1).float().to(self.device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()

        def one():
            with torch.no_grad(), autocast:
                predict(model, x, self.cfg.train_deeplab.test_scales, True)

        return _timed(one, self.args.steps, self.device)


def recipe(cfg: Config, train_images: int, val_images: int) -> list[tuple[str, int, str]]:
    """(stage, images processed in the recipe, what they are)."""
    n = train_images
    return [
        ("train_classifier", cfg.train_classifier.epochs * n, f"{cfg.train_classifier.epochs} epochs x {n}"),
        ("train_cgnet", cfg.train_cgnet.epochs * n, f"{cfg.train_cgnet.epochs} epochs x {n}"),
        ("make_cam", n, f"{n} x {len(cfg.cam.scales) * (2 if cfg.cam.flip else 1)} passes"),
        ("crf", n, f"{n} x 2 alphas"),
        ("train_affinity", cfg.train_affinity.epochs * n, f"{cfg.train_affinity.epochs} epochs x {n}"),
        ("make_pseudo_labels", n, f"{n} images"),
        ("train_deeplab", cfg.train_deeplab.epochs * n, f"{cfg.train_deeplab.epochs} epochs x {n}"),
        ("infer_val", val_images, f"{val_images} x {len(cfg.train_deeplab.test_scales)} scales x flip"),
    ]


def _size(text: str) -> tuple[int, int]:
    w, h = (int(x) for x in text.lower().split("x"))
    return h, w


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/voc/r38.yaml"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=float, default=1.0, help="ResNet38 channel multiplier (1 = the paper)")
    p.add_argument("--image", type=_size, default=(375, 500), help="WxH of the inference images (VOC: 500x375)")
    p.add_argument("--max-batch", type=int, default=1 << 30, help="cap on the training batch (the config's otherwise)")
    p.add_argument("--max-crop", type=int, default=1 << 30, help="cap on the training crop (the config's otherwise)")
    p.add_argument("--steps", type=int, default=3, help="timed steps / images per stage after one warm-up")
    p.add_argument("--train-images", type=int, default=10582, help="VOC train_aug")
    p.add_argument("--val-images", type=int, default=1449, help="VOC val")
    p.add_argument("--stages", default="", help="comma-separated subset (default: all)")
    args = p.parse_args()
    cfg = load_config(args.config, [])
    torch.manual_seed(0)
    bench = Bench(cfg, args)
    rows = recipe(cfg, args.train_images, args.val_images)
    wanted = set(args.stages.split(",")) if args.stages else {r[0] for r in rows}
    print(f"VOC recipe on {args.device}: ResNet38 width {args.width:g}, images {args.image[1]}x{args.image[0]}, "
          f"training batch <= {args.max_batch}, crop <= {args.max_crop}, {args.steps} timed units per stage")
    print(f"{'stage':<20}{'s / image':>11}{'images':>11}  {'recipe':<28}{'hours':>8}")
    total = 0.0
    for name, count, what in rows:
        if name not in wanted:
            continue
        per = getattr(bench, name)()
        total += per * count
        print(f"{name:<20}{per:>11.4f}{count:>11}  {what:<28}{per * count / 3600:>8.2f}")
    print(f"{'total':<20}{'':>11}{'':>11}  {'':<28}{total / 3600:>8.2f}")


if __name__ == "__main__":
    main()
