"""The bench scripts run (at tiny sizes, on the CPU) so that they cannot rot unnoticed."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_main(module, argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [module.__file__] + argv)
    try:
        module.main()
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().out
    return capsys.readouterr().out


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_cgnet_step_variants(one_thread):
    """The official configuration and caee's step (with levers) each run and report a rate and a peak."""
    bench = _load("bench_cgnet_step")
    for variant in ("official", "caee", "caee+foreach+channels_last", "caee+oc_grads"):
        args = bench.argparse.Namespace(device="cpu", width=0.0625, size=32, batch=2, steps=1, warmup=1,
                                        threads=1, variant=variant)
        row = bench.run_variant(args)
        assert row["variant"] == variant and row["images_per_s"] > 0 and row["peak_mib"] > 0
    with pytest.raises(SystemExit):
        bench.run_variant(bench.argparse.Namespace(**{**vars(args), "variant": "caee+warp"}))


def test_cgnet_step_official_oc_gets_weight_gradients_and_caee_not(one_thread):
    bench = _load("bench_cgnet_step")
    args = bench.argparse.Namespace(width=0.0625, size=32, batch=2)
    device = torch.device("cpu")
    oc_grads = {}
    for name in ("official", "caee"):
        oc_holder = {}
        real = bench._nets

        def spy(width, dev, real=real, oc_holder=oc_holder):
            oc, cgnet = real(width, dev)
            oc_holder["oc"] = oc
            return oc, cgnet

        bench._nets = spy
        try:
            step = bench.official_step_fn(args, device) if name == "official" else bench.caee_step_fn(args, device, set())
            step()
        finally:
            bench._nets = real
        oc_grads[name] = any(p.grad is not None for p in oc_holder["oc"].parameters())
    assert oc_grads == {"official": True, "caee": False}


def test_pipeline_table(one_thread, monkeypatch, capsys):
    bench = _load("bench_pipeline")
    out = _run_main(bench, ["--device", "cpu", "--width", "0.0625", "--image", "96x72", "--max-batch", "1",
                            "--max-crop", "32", "--steps", "1", "--train-images", "100", "--val-images", "10"],
                    monkeypatch, capsys)
    stages = ["train_classifier", "train_cgnet", "make_cam", "crf", "train_affinity", "make_pseudo_labels",
              "train_deeplab", "infer_val"]
    hours = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in stages + ["total"]:
            hours[parts[0]] = float(parts[-1])
    assert set(hours) == set(stages) | {"total"}
    assert all(h >= 0 for h in hours.values())
    assert hours["total"] == pytest.approx(sum(hours[s] for s in stages), abs=0.01 * len(stages))


def test_eval_bench_agrees_with_plain_reference(monkeypatch, capsys):
    bench = _load("bench_eval")
    out = _run_main(bench, ["--images", "22", "--height", "24", "--width", "32", "--repeats", "1", "--workers", "1"],
                    monkeypatch, capsys)
    assert "mIoU agrees" in out
    m = re.search(r"largest difference to the plain reference ([0-9.e+-]+)", out)
    assert m and float(m.group(1)) == 0.0


def test_eval_bench_reads_official_output():
    bench = _load("bench_eval")
    text = "".join(f"{i}/60 threshold: {t:.3f}\tmIoU: {40 + i / 10:.3f}%\n" for i, t in enumerate(bench.THRESHOLDS))
    assert bench.parse_official(text) == pytest.approx([40 + i / 10 for i in range(30)])


def test_crf_bench_one_and_two_workers(monkeypatch, capsys):
    bench = _load("bench_crf")
    out = _run_main(bench, ["--images", "2", "--height", "30", "--width", "40", "--repeats", "1"], monkeypatch, capsys)
    assert "labels identical" in out
    assert re.search(r"speed-up of 2 workers over 1 \(median images/s\): [0-9.]+x", out)
