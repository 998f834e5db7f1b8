"""The pipeline on a miniature synthetic experiment: kill-and-resume, every artifact, the results table."""
import json
import logging
import re
import signal
import time
from pathlib import Path

import pytest

from caee.core import records
from caee.pipeline import run as pipeline
from caee.pipeline.runner import jobs_of
from caee.data import load_split
from caee.engine.scoring import evaluate_dir
from caee.core.config import save_config
import forks
from conftest import mini_config

STAGES = ["train_classifier", "train_cgnet", "train_control", "cam_classifier", "cam_cgnet", "cam_control",
          "train_affinity", "pseudo_labels", "train_deeplab"]


def _mini(tmp_path):
    return mini_config(tmp_path, **{"cam.crf_alphas": [4, 24], "pipeline.pictures": 3, "pseudo_labels.steps": 4})


def _parse_markdown_table(text: str) -> list[dict]:
    lines = [l for l in text.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        rows.append(dict(zip(header, cells)))
    return rows


def test_killed_pipeline_resumes_and_writes_every_artifact_and_a_parsable_table(tmp_path, caplog):
    """A pipeline process killed (SIGKILL) in the stage after train_cgnet, run again: the finished
    stages are skipped, not retrained, and the resumed run writes every artifact and the table."""
    cfg = _mini(tmp_path)
    work = Path(cfg.work_dir)
    proc = forks.start(pipeline.run, cfg)
    cgnet = work / "train_cgnet"

    def finished(folder: Path) -> bool:
        try:
            return bool((records.read(folder) or {}).get("complete"))
        except Exception:  # noqa: BLE001 - caught mid-write would be a bug, but is checked below
            return False
    deadline = time.time() + 120
    while not finished(cgnet) and time.time() < deadline and proc.is_alive():
        time.sleep(0.02)
    proc.kill()  # in the middle of the next stage (or just after it started)
    proc.join()
    assert records.read(cgnet)["complete"] == ["all"] and proc.exitcode == -signal.SIGKILL
    assert records.read(work / "train_deeplab") is None
    before = {p: p.read_bytes() for p in (work / "train_classifier" / "record.json", cgnet / "record.json")}
    # the step the kill interrupted (if it had started its output): its record, not complete
    control = records.read(work / "control" / "train_cgnet")
    assert control is None or control["complete"] == []
    oc = work / "train_classifier" / "model.pth"
    mtime = oc.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="caee"):
        result = pipeline.run(cfg)
    skipped = [r.getMessage() for r in caplog.records if "finished earlier" in r.getMessage()]
    assert [m.split(": ")[1].split(" ")[0] for m in skipped] == ["train_classifier", "train_cgnet"], skipped
    assert oc.stat().st_mtime_ns == mtime          # not retrained
    assert {p: p.read_bytes() for p in before} == before  # the finished records are not rewritten
    if control is not None:  # the interrupted step resumed: the same run, now complete
        assert records.read(work / "control" / "train_cgnet")["run"] == control["run"]
    for job in jobs_of(cfg, pipeline.plan(cfg)):
        assert job.status() == [], job.step.name
    for path in ["train_classifier/model.pth", "train_cgnet/model.pth", "control/train_cgnet/model.pth",
                 "train_affinity/model.pth", "train_deeplab/model.pth", "train_deeplab/results_val.json",
                 "results.md", "results.json", "fig3_cams.png", "fig4_segmentation.png"]:
        assert (work / path).exists(), path
    for folder in ["cam_classifier", "cam_cgnet", "cam_cgnet_crf_4", "cam_cgnet_crf_24", "control/cam_cgnet",
                   "pseudo_labels"]:
        assert records.read(work / folder)["complete"] == ["train"], folder
    for folder in ["train_classifier", "train_cgnet", "control/train_cgnet", "train_affinity", "train_deeplab"]:
        assert records.read(work / folder)["complete"] == ["all"], folder
    # a CRF folder names the CAM folder's run it was made from
    assert records.read(work / "cam_cgnet_crf_4")["settings"]["input.cams"] == records.read(work / "cam_cgnet")["run"]
    rows = _parse_markdown_table((work / "results.md").read_text())
    outputs = [r["output"] for r in rows]
    assert outputs == ["OC CAM", "CGNet CAM", "control CAM (w = 0)", "CGNet CAM + CRF (alpha 4)",
                       "CGNet CAM + CRF (alpha 24)", "pseudo labels", "DeepLab prediction"]
    for r, j in zip(rows, result["rows"]):
        assert float(r["mIoU (%)"]) == pytest.approx(100 * j["miou"], abs=0.051)
        # each number equals the evaluation run separately on the row's folder (eval_miou's code path)
        if j["output"] == "DeepLab prediction":
            separate = json.loads((work / "train_deeplab" / "results_val.json").read_text())["miou"]
        else:
            index = load_split(cfg.data, j["split"])
            separate = evaluate_dir(Path(j["folder"]), index, cfg.eval)["summary"]["miou"]
        assert j["miou"] == separate, j["output"]
    assert {r["split"] for r in rows} == {"train", "val"}
    saved = json.loads((work / "results.json").read_text())
    assert saved["rows"][0]["num_images"] == 16 and set(saved) == {"rows", "pictures"}  # no wall times
    assert json.loads((work / "timings.json").read_text())["stage_seconds"] == result["stage_seconds"]
    # the stage table has the README's columns; trainers give training images/s, inference (N images/s)
    stages = _parse_markdown_table((work / "results.md").read_text().split("\n\n")[1])
    assert list(stages[0]) == ["stage", "seconds", "training images/s"]
    by_stage = {r["stage"]: r for r in stages}
    assert [r["stage"] for r in stages][:5] == ["train_classifier", "train_cgnet", "train_control", "cam_classifier",
                                                "cam_cgnet (+ 2 CRFs)"]
    assert float(by_stage["train_classifier"]["training images/s"]) > 0
    assert re.fullmatch(r"\(\d+ images/s\)", by_stage["pseudo_labels"]["training images/s"])
    assert by_stage["total"]["seconds"] == f"{sum(result['stage_seconds'].values()):.0f}"
    # one folder per stage: the pseudo-label stage logs where it writes
    assert (work / "pseudo_labels" / "log.txt").is_file() and not (work / "make_pseudo_labels").exists()
    # each stage run on its own accepts what the pipeline made: `caee run` writes the input paths
    # out, a stage alone derives them, and both record the same settings
    from caee.stages import make_cam, make_pseudo_labels, train_affinity, train_cgnet

    assert train_cgnet.main(cfg).steps > 0 and train_affinity.main(cfg).steps > 0
    assert make_cam.main(cfg).computed == 0 and make_pseudo_labels.main(cfg) == work / "pseudo_labels"


def test_unknown_stage_is_refused(tmp_path):
    from caee.core.errors import CaeeError
    with pytest.raises(CaeeError, match="unknown stage.*train_cgnet"):
        pipeline.run(_mini(tmp_path), only=["train_cgnett"])
