"""Random walk at VOC size: sparse T applied t times (caee.method.random_walk) vs PSA's dense squaring.

Setting: a 500 x 500 image -> 63 x 63 feature map (n = 3969), 21 score channels (background +
20 CAMs), radius 5 (PSA's pair set), beta 8, t = 256, float32. Timed: affinities + scores ->
random-walk scores (matrix construction included for both methods). Labels: bilinear upsampling
+ argmax, identical code for both; the script checks that they agree pixel for pixel.

Each (method, device) runs in its own subprocess so that peak memory is measurable:
CPU: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the first run minus before it (tracemalloc
does not see torch's allocator); CUDA: ``torch.cuda.max_memory_allocated`` minus the memory held
before the run.

    python bench/bench_random_walk.py                       # cpu (+ cuda if available), 3 runs each
    python bench/bench_random_walk.py --devices cpu --repeats 5 --dense-repeats 1
    python bench/bench_random_walk.py --variants sparse,sparse-sq1,sparse-b8,dense
    python bench/bench_random_walk.py --devices cpu --threads 1 --variants sparse,dense
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from caee.method.affinity import offset_affinity, pair_indices  # noqa: E402
from caee.method.random_walk import (cam_scores_with_background, dense_random_walk_reference,  # noqa: E402
                              random_walk, transition_matrix)

IMG, STRIDE, N_FG, RADIUS, BETA, STEPS, ALPHA = 500, 8, 20, 5, 8.0, 256, 16.0


def make_inputs(device: str) -> tuple[torch.Tensor, ...]:
    """Synthetic but realistic: features piecewise constant over a few blobs plus noise, CAMs that
    cover the blobs of three present classes partially, 17 absent classes with weak noise."""
    g = torch.Generator().manual_seed(0)
    h = w = -(-IMG // STRIDE)
    yy, xx = torch.meshgrid(torch.arange(IMG, dtype=torch.float32), torch.arange(IMG, dtype=torch.float32),
                            indexing="ij")
    region = torch.zeros(IMG, IMG, dtype=torch.long)
    blobs = [(150, 140, 90, 1), (320, 330, 120, 2), (380, 120, 70, 3), (110, 380, 60, 1)]
    for cy, cx, r, lab in blobs:
        region[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = lab
    emb = torch.randn(4, 32, generator=g)
    feat_full = emb[region].permute(2, 0, 1)  # (32, H, W)
    feats = F.avg_pool2d(F.pad(feat_full, (0, h * STRIDE - IMG, 0, w * STRIDE - IMG))[None], STRIDE)
    feats = feats + 0.3 * torch.randn(feats.shape, generator=g)
    f, t = pair_indices(h, w, RADIUS, psa_border=True)
    aff = offset_affinity(feats, RADIUS, psa_border=True)[0]
    cams = 0.05 * torch.rand(N_FG, IMG, IMG, generator=g)
    for cls, lab in ((4, 1), (11, 2), (14, 3)):
        inside = (region == lab).float()
        cams[cls] = inside * (0.3 + 0.7 * torch.rand(IMG, IMG, generator=g)) * (yy % 97 < 60).float()
    scores = cam_scores_with_background(cams, ALPHA, STRIDE)
    return tuple(x.detach().to(device) for x in (scores, aff, f, t))


def variant_options(method: str) -> dict[str, int]:
    """``sparse-sq1-b8`` -> ``{"sq": 1, "b": 8}`` (sqK: K squarings, bB: B images batched)."""
    opts = {}
    for tok in method.split("-")[1:]:
        m = re.fullmatch(r"(sq|b)(\d+)", tok)
        if m is None:
            raise SystemExit(f"unknown variant option {tok!r} in {method!r}")
        opts[m.group(1)] = int(m.group(2))
    return opts


def run_method(method: str, scores, aff, f, t) -> torch.Tensor:
    if method == "dense":
        return dense_random_walk_reference(scores, aff, f, t, beta=BETA, steps=STEPS)
    opts = variant_options(method)
    n_img = opts.get("b", 1)
    if n_img > 1:  # B images in one block-diagonal walk; the same image repeated, result of the first
        trans = transition_matrix(aff.expand(n_img, -1), f, t, scores.shape[1] * scores.shape[2], beta=BETA)
        scores = scores.expand(n_img, -1, -1, -1)
        return random_walk(scores, trans, steps=STEPS, squarings=opts.get("sq", 0))[0]
    trans = transition_matrix(aff, f, t, scores.shape[1] * scores.shape[2], beta=BETA)
    return random_walk(scores, trans, steps=STEPS, squarings=opts.get("sq", 0))


def labels_from(rw: torch.Tensor) -> np.ndarray:
    h, w = rw.shape[1:]
    up = F.interpolate(rw[None].float(), size=(h * STRIDE, w * STRIDE), mode="bilinear",
                       align_corners=False)[0, :, :IMG, :IMG]
    return up.argmax(0).to(torch.uint8).cpu().numpy()


def worker(method: str, device: str, repeats: int, out_dir: str) -> None:
    # inputs come from the parent so that building them does not set this process's peak RSS
    loaded = torch.load(os.path.join(out_dir, "inputs.pt"), weights_only=True)
    inputs = tuple(x.to(device) for x in loaded)
    cuda = device.startswith("cuda")
    batch = variant_options(method).get("b", 1)
    f, t = pair_indices(12, 12, RADIUS)  # warm-up on a tiny grid: library initialisation, little memory
    run_method(method, torch.rand(3, 12, 12, device=device), torch.rand(f.numel(), device=device),
               f.to(device), t.to(device))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for i in range(repeats):
        sync()
        t0 = time.perf_counter()
        rw = run_method(method, *inputs)
        sync()
        times.append((time.perf_counter() - t0) / batch)  # per image
        if i == 0:
            rss_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # KiB on Linux
            gpu_mib = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    tag = f"{method}_{device.replace(':', '')}"
    np.save(os.path.join(out_dir, tag + "_scores.npy"), rw.float().cpu().numpy())
    np.save(os.path.join(out_dir, tag + "_labels.npy"), labels_from(rw))
    print(json.dumps({"method": method, "device": device, "times": times, "rss_mib": rss_mib,
                      "gpu_mib": gpu_mib, "threads": torch.get_num_threads()}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="auto", help="comma list (cpu,cuda) or auto")
    ap.add_argument("--variants", default="sparse,dense",
                    help="comma list of dense, sparse, sparse-sqK (K squarings), sparse-bB (B images batched "
                         "block-diagonally, time per image), e.g. sparse-sq1-b8")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of the sparse variants (median)")
    ap.add_argument("--dense-repeats", type=int, default=3, help="timed runs of the dense reference")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads in the workers (0 = torch's default)")
    ap.add_argument("--worker", nargs=3, metavar=("METHOD", "DEVICE", "OUT_DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-repeats", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        worker(*args.worker[:2], args.worker_repeats, args.worker[2])
        return 0
    devices = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])) if args.devices == "auto" \
        else args.devices.split(",")
    variants = args.variants.split(",")
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as out_dir:
        torch.save(make_inputs("cpu"), os.path.join(out_dir, "inputs.pt"))
        for dev in devices:
            for var in variants:
                reps = args.dense_repeats if var == "dense" else args.repeats
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", var, dev, out_dir,
                       "--worker-repeats", str(reps), "--threads", str(args.threads)]
                res = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if res.returncode:
                    print(f"{var} on {dev} failed:\n{res.stderr[-2000:]}")
                    ok = False
                    continue
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"random walk, {IMG}x{IMG} image -> {-(-IMG // STRIDE)}^2 features, {N_FG + 1} channels, "
              f"t={STEPS}, beta={BETA:g}, radius {RADIUS}, float32; torch {torch.__version__}")
        if torch.cuda.is_available():
            print("cuda device:", torch.cuda.get_device_name())
        print(f"{'device':6} {'method':13} {'threads':>7} {'runs':>4} {'median s':>10} {'min s':>9} "
              f"{'peak MiB':>9} {'speedup':>8} {'labels == dense':>16} {'max |d score|':>13}")
        for r in rows:
            dense = next((d for d in rows if d["device"] == r["device"] and d["method"] == "dense"), None)
            med = statistics.median(r["times"])
            mem = r["gpu_mib"] if r["gpu_mib"] is not None else r["rss_mib"]
            speed, same, dmax = "", "", ""
            if dense is not None:
                speed = f"{statistics.median(dense['times']) / med:7.1f}x"
                tag = lambda x: f"{x['method']}_{x['device'].replace(':', '')}"  # noqa: E731
                la = np.load(os.path.join(out_dir, tag(r) + "_labels.npy"))
                lb = np.load(os.path.join(out_dir, tag(dense) + "_labels.npy"))
                sa = np.load(os.path.join(out_dir, tag(r) + "_scores.npy"))
                sb = np.load(os.path.join(out_dir, tag(dense) + "_scores.npy"))
                n_diff = int((la != lb).sum())
                same = "yes" if n_diff == 0 else f"NO ({n_diff} px)"
                dmax = f"{np.abs(sa - sb).max():.2e}"
                ok &= n_diff == 0
            print(f"{r['device']:6} {r['method']:13} {r['threads']:7d} {len(r['times']):4d} {med:10.4f} "
                  f"{min(r['times']):9.4f} {mem:9.1f} {speed:>8} {same:>16} {dmax:>13}")
        print("peak MiB: CPU = ru_maxrss growth during the first run (0 = below what malloc already held);"
              " CUDA = max_memory_allocated growth")
        scores, aff, f, t = torch.load(os.path.join(out_dir, "inputs.pt"), weights_only=True)
        n = scores.shape[1] * scores.shape[2]
        trans = transition_matrix(aff, f, t, n, beta=BETA)
        nbytes = sum(x.numel() * x.element_size() for x in (trans.ccol_indices(), trans.row_indices(),
                                                             trans.values()))
        print(f"sparse T: nnz {trans.values().numel()} = {nbytes / 2**20:.1f} MiB; dense n x n float32: "
              f"{n * n * 4 / 2**20:.1f} MiB per matrix")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
