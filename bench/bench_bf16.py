"""bf16 autocast against float32 on the demo's stages, on the CPU (docs/NUMERICS.md).

caee autocasts to bf16 on CUDA only (``train_*.amp``, ``cam.amp``). PyTorch's CPU autocast supports
bfloat16 too, so this script turns it on for the CPU (by wrapping the two places that choose the
context: the trainer's and the CAM inference's) and runs the demo's stages twice, otherwise
identical, each from the same float32 inputs:

1. CGNet training with erasing (the frozen OC's gradient path included) against the same OC:
   the loss curve (``metrics.jsonl``) and the CAM mIoU of each CGNet (CAMs made in float32, so
   that the row measures training alone), at the best threshold of the sweep and at the fixed one.
2. CAM inference alone, from the same float32 CGNet: the largest CAM difference and the mIoU
   difference (``cam.dtype=float32`` files, so the float16 file rounding does not hide it).
3. AffinityNet training on the same CRF labels (from the float32 CGNet's CAMs), then the random
   walk: the pseudo-label mIoU (the walk itself has no autocast).

    python bench/bench_bf16.py                                   # the demo's 2,000 training images
    python bench/bench_bf16.py --num-train 500 --work /tmp/bf16  # a reduced demo (stated in the table)

Prints a markdown table; writes every output under ``--work`` (default /tmp/caee_bench_bf16),
which is emptied first. Not run by the tests (minutes of CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from caee.core.config import load_config  # noqa: E402
from caee.core.io import load_cam_npz  # noqa: E402
import caee.engine.trainer as trainer_module  # noqa: E402
import caee.method.cam as cam_module  # noqa: E402
from caee.stages import eval_miou, make_cam, make_pseudo_labels, train_affinity, train_cgnet, train_classifier  # noqa: E402

_BF16 = {"on": False}
_TRAINER_NULLCONTEXT = trainer_module.nullcontext
_CAM_AUTOCAST = cam_module._autocast


def _trainer_context():
    # the trainer picks CUDA autocast or nullcontext(); on the CPU it gets here
    if _BF16["on"]:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return _TRAINER_NULLCONTEXT()


def _cam_context(device, amp):
    if _BF16["on"] and amp and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return _CAM_AUTOCAST(device, amp)


trainer_module.nullcontext = _trainer_context
cam_module._autocast = _cam_context


@contextlib.contextmanager
def bf16(on: bool):
    _BF16["on"] = on
    try:
        yield
    finally:
        _BF16["on"] = False


def config(common: list[str], work_dir: Path, *extra: str):
    return load_config(str(REPO / "configs" / "demo.yaml"), common + [f"work_dir={work_dir}", *extra])


def loss_curve(stage_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r["loss"])) for r in rows if "loss" in r]


def evaluate(cfg_common: list[str], work_dir: Path, folder: Path, kind: str) -> dict:
    cfg = config(cfg_common, work_dir, f"eval.dir={folder}", f"eval.kind={kind}",
                 f"eval.out={folder.parent / ('eval_' + folder.name + '.json')}")
    return eval_miou.main(cfg)["summary"]


def max_cam_difference(a: Path, b: Path) -> tuple[float, int]:
    worst, n = 0.0, 0
    for f in sorted(a.glob("*.npz")):
        ka, ca = load_cam_npz(f)
        kb, cb = load_cam_npz(b / f.name)
        assert np.array_equal(ka, kb), f
        worst = max(worst, float(np.abs(ca.astype(np.float64) - cb.astype(np.float64)).max()))
        n += 1
    return worst, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/caee_bench_bf16")
    p.add_argument("--num-train", type=int, default=2000, help="synthetic training images (demo: 2000)")
    p.add_argument("--cgnet-epochs", type=int, default=0, help="0 = the demo's")
    p.add_argument("--affinity-epochs", type=int, default=0, help="0 = the demo's")
    p.add_argument("--walk-images", type=int, default=0, help="pseudo labels of the first N training images (0 = all)")
    p.add_argument("--oc", default="", help="an OC model.pth trained on --data-root's images (float32); "
                                            "default: train one here")
    p.add_argument("--data-root", default="", help="default: <work>/synthetic")
    p.add_argument("--skip-affinity", action="store_true")
    args = p.parse_args()
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    root = Path(args.data_root) if args.data_root else work / "synthetic"
    common = ["device=cpu", f"data.root={root}", f"data.synthetic.num_train={args.num_train}",
              "data.synthetic.num_val=20", "cam.dtype=float32", "cam.crf_alphas=[]", "pipeline.control=false"]
    if args.cgnet_epochs:
        common.append(f"train_cgnet.epochs={args.cgnet_epochs}")
    if args.affinity_epochs:
        common.append(f"train_affinity.epochs={args.affinity_epochs}")
    fp32, b16 = work / "fp32", work / "bf16"
    oc = Path(args.oc) if args.oc else fp32 / "train_classifier" / "model.pth"
    cgnet32 = fp32 / "train_cgnet" / "model.pth"
    t0 = time.perf_counter()
    rows: list[tuple[str, str, str, str]] = []

    if not args.oc:
        train_classifier.main(config(common, fp32))                      # the one OC (float32)
    for name, wd in (("fp32", fp32), ("bf16", b16)):
        with bf16(name == "bf16"):
            train_cgnet.main(config(common, wd, f"train_cgnet.oc_weights={oc}"))
        make_cam.main(config(common, wd, "cam.amp=false"))              # float32 CAMs of each CGNet
    curves = {n: loss_curve(wd / "train_cgnet") for n, wd in (("fp32", fp32), ("bf16", b16))}
    cam = {n: evaluate(common, wd, wd / "cam_cgnet", "cam") for n, wd in (("fp32", fp32), ("bf16", b16))}

    infer_dir = work / "cam_cgnet_bf16_inference"
    with bf16(True):
        make_cam.main(config(common, fp32, "cam.amp=true", f"cam.weights={cgnet32}", f"cam.out_dir={infer_dir}"))
    infer = evaluate(common, fp32, infer_dir, "cam")
    worst, n_cams = max_cam_difference(fp32 / "cam_cgnet", infer_dir)

    pseudo = {}
    walk_split = []
    if args.walk_images:
        ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:args.walk_images]
        (root / "ImageSets" / "Segmentation" / "bench_walk.txt").write_text("\n".join(ids) + "\n")
        walk_split = ["pseudo_labels.split=bench_walk", "eval.split=bench_walk"]
    if not args.skip_affinity:
        for name in ("fp32", "bf16"):
            wd = work / f"affinity_{name}"
            cams = fp32 / "cam_cgnet"                                     # CRF labels made here once, shared
            extra = [f"train_affinity.cam_dir={cams}", f"train_affinity.init={cgnet32}", f"pseudo_labels.cam_dir={cams}"]
            with bf16(name == "bf16"):
                train_affinity.main(config(common, wd, *extra))
            make_pseudo_labels.main(config(common, wd, *extra, *walk_split))
            pseudo[name] = evaluate(common + walk_split, wd, wd / "pseudo_labels", "label")
    elapsed = time.perf_counter() - t0

    def pct(x: float) -> str:
        return f"{100 * x:.2f}"

    def curve_text(c: list[tuple[int, float]]) -> str:
        picks = [c[0], c[len(c) // 2], c[-1]] if c else []
        return ", ".join(f"step {s}: {v:.4f}" for s, v in picks)

    steps32 = dict(curves["fp32"])
    common_steps = [s for s, _ in curves["bf16"] if s in steps32]
    diffs = [abs(v - steps32[s]) for s, v in curves["bf16"] if s in steps32]
    size = f"{args.num_train} training images" + ("" if args.num_train == 2000 else " (reduced demo; the demo has 2000)")
    if args.cgnet_epochs or args.affinity_epochs or args.walk_images:
        size += (f", CGNet epochs {config(common, fp32).train_cgnet.epochs}, AffinityNet epochs "
                 f"{config(common, fp32).train_affinity.epochs}, pseudo labels of "
                 f"{args.walk_images or args.num_train} images")
    print(f"\nbf16 autocast vs float32 on the CPU, configs/demo.yaml, {size}, "
          f"{torch.get_num_threads()} threads, {elapsed:.0f} s in all\n")
    print("| what | float32 | bf16 autocast | difference |")
    print("|---|---|---|---|")
    print(f"| CGNet loss (logged every {config(common, fp32).train_cgnet.log_every} steps) | "
          f"{curve_text(curves['fp32'])} | {curve_text(curves['bf16'])} | "
          f"largest {max(diffs):.4f} over {len(common_steps)} logged steps |")
    for key, label in (("miou", "best threshold"), ("miou_at_threshold", "fixed threshold")):
        a, b = cam["fp32"], cam["bf16"]
        extra = f" (t = {a['best_threshold']} / {b['best_threshold']})" if key == "miou" else f" (t = {a.get('threshold', 0.25)})"
        rows.append((f"CGNet trained with bf16: CAM mIoU, {label}{extra}", pct(a[key]), pct(b[key]),
                     f"{100 * (b[key] - a[key]):+.2f} points"))
    a = cam["fp32"]
    rows.append(("bf16 CAM inference of the float32 CGNet: largest CAM difference", "", "",
                 f"{worst:.4f} over {n_cams} images"))
    for key, label in (("miou", "best threshold"), ("miou_at_threshold", "fixed threshold")):
        rows.append((f"bf16 CAM inference of the float32 CGNet: mIoU, {label}", pct(a[key]), pct(infer[key]),
                     f"{100 * (infer[key] - a[key]):+.3f} points"))
    if pseudo:
        rows.append(("AffinityNet trained with bf16, then the walk: pseudo-label mIoU", pct(pseudo["fp32"]["miou"]),
                     pct(pseudo["bf16"]["miou"]), f"{100 * (pseudo['bf16']['miou'] - pseudo['fp32']['miou']):+.2f} points"))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
