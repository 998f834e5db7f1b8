"""The step runner and the records (caee/pipeline/runner.py, caee/core/records.py): same settings skip,
a changed key re-runs exactly the steps it affects (and those downstream: their records name the
upstream run ids), an interrupted step resumes with its run id, an interrupted run with other
settings starts over, an unreadable record or one of another version is one CaeeError naming it.

The first tests replace the stages by a stub that opens, fills and finishes each step's output
folder the way a stage does (caee/stages/common.py open_output, records.finish), so they train
nothing; the last ones read conftest.py's finished miniature pipeline (built once per session, copied
per test)."""
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from caee import cli
from caee.core import records
from caee.core.config import expand_work_dir, save_config
from caee.core.errors import CaeeError
from caee.pipeline import run as pipeline
from caee.pipeline import runner
from caee.pipeline.runner import jobs_of, run_jobs
from caee.stages.common import open_output, stage_settings
from caee.stages.table import plan
from conftest import mini_config

PLAN = ["train_classifier", "train_cgnet", "cam_classifier", "cam_cgnet", "train_affinity", "pseudo_labels",
        "train_deeplab"]


@pytest.fixture
def calls(monkeypatch):
    """Replace the stage calls by a stub that does what a stage does with its output folder: open its
    record (resume, refuse, or start over with ``overwrite``), write a file (a trainer's model.pth,
    which downstream steps read), then mark its part complete."""
    made: list[str] = []

    def fake(job, call, k, nproc):
        made.append(job.step.name)
        folder = job.output(call)
        folder.mkdir(parents=True, exist_ok=True)
        settings = stage_settings(call, job.stage.name)
        record = open_output(folder, job.stage.name, settings, getattr(call, job.stage.section).overwrite)
        if job.stage.part(call) == "all":
            torch.save({"step": job.step.name}, folder / records.MODEL)
        (folder / f"out{k}.txt").write_text(job.step.name)
        records.finish(folder, record, job.stage.part(call), 0.1, 10.0)
    monkeypatch.setattr(runner, "_call_stage", fake)
    return made


def _run(cfg, calls, **kw):
    calls.clear()
    jobs = jobs_of(cfg, PLAN)
    summary = run_jobs(jobs, **kw)
    return list(calls), summary


def _record(cfg, folder: str) -> dict:
    return json.loads((Path(cfg.work_dir) / folder / records.RECORD).read_text())


def _runs(cfg) -> dict[str, str]:
    """The run id in the record of every step's output folder."""
    return {j.step.name: records.read(j.writes[0])["run"] for j in jobs_of(cfg, PLAN)}


def test_same_settings_skip_and_a_changed_key_reruns_exactly_what_it_affects(tmp_path, calls):
    cfg = mini_config(tmp_path)
    ran, _ = _run(cfg, calls)
    assert ran == PLAN
    record = _record(cfg, "cam_cgnet")
    assert record["stage"] == "make_cam" and record["settings"]["cam.source"] == "cgnet" and record["run"]
    assert record["complete"] == ["train"] and "cam.out_dir" not in record["settings"]  # a path key: by id only
    assert record["settings"]["input.weights"] == _record(cfg, "train_cgnet")["run"]
    pl = _record(cfg, "pseudo_labels")["settings"]
    assert pl["input.cams"] == record["run"] and pl["input.affinitynet"] == _record(cfg, "train_affinity")["run"]
    assert _record(cfg, "train_classifier")["complete"] == ["all"]

    before = {p: p.read_bytes() for p in Path(cfg.work_dir).rglob(records.RECORD)}
    ran, summary = _run(cfg, calls)
    assert ran == [] and summary.skipped == PLAN and summary.ran == []
    assert {p: p.read_bytes() for p in Path(cfg.work_dir).rglob(records.RECORD)} == before  # not rewritten

    # a key read only by AffinityNet: it and what reads its output run again (new run ids), nothing upstream
    runs = _runs(cfg)
    cfg = mini_config(tmp_path, **{"train_affinity.lr": 0.5})
    ran, _ = _run(cfg, calls)
    assert ran == ["train_affinity", "pseudo_labels", "train_deeplab"]
    now = _runs(cfg)
    assert [s for s in PLAN if now[s] != runs[s]] == ran
    assert _record(cfg, "train_affinity")["settings"]["train_affinity.lr"] == 0.5
    # a CAM key: both CAM steps and everything after them
    runs = now
    cfg = mini_config(tmp_path, **{"train_affinity.lr": 0.5, "cam.scales": [1.0, 0.5]})
    ran, _ = _run(cfg, calls)
    assert ran == ["cam_classifier", "cam_cgnet", "train_affinity", "pseudo_labels", "train_deeplab"]
    now = _runs(cfg)
    assert [s for s in PLAN if now[s] != runs[s]] == ran
    # the OC: everything
    cfg = mini_config(tmp_path, **{"train_affinity.lr": 0.5, "cam.scales": [1.0, 0.5], "train_classifier.lr": 0.5})
    ran, _ = _run(cfg, calls)
    assert ran == PLAN
    # speed / logging keys are not settings
    ran, _ = _run(mini_config(tmp_path, **{"train_affinity.lr": 0.5, "cam.scales": [1.0, 0.5],
                                           "train_classifier.lr": 0.5, "train_cgnet.log_every": 7}), calls)
    assert ran == []


def test_a_rerun_removes_the_stale_outputs_first(tmp_path, calls):
    cfg = mini_config(tmp_path)
    _run(cfg, calls)
    stale = Path(cfg.work_dir) / "train_affinity" / "stale.pth"
    stale.write_text("old")
    _run(mini_config(tmp_path, **{"train_affinity.lr": 0.5}), calls)
    assert not stale.exists() and (Path(cfg.work_dir) / "train_affinity" / "out0.txt").is_file()


def test_an_unreadable_record_is_one_error_naming_it(tmp_path, calls):
    cfg = mini_config(tmp_path)
    _run(cfg, calls)
    path = Path(cfg.work_dir) / "train_cgnet" / records.RECORD
    path.write_text("{not json")
    with pytest.raises(CaeeError, match=r"train_cgnet/record\.json is unreadable") as e:
        _run(cfg, calls)
    assert e.value.__cause__ is None and "Traceback" not in str(e.value)
    assert calls == [] and path.read_text() == "{not json"  # nothing ran, nothing was replaced


def test_a_record_of_another_version_is_refused(tmp_path, calls):
    cfg = mini_config(tmp_path)
    _run(cfg, calls)
    path = Path(cfg.work_dir) / "train_cgnet" / records.RECORD
    path.write_text(json.dumps({"seconds": 3.0}))  # what an older version might have left
    with pytest.raises(CaeeError, match=r"train_cgnet/record\.json is not a record of this version.*--overwrite"):
        _run(cfg, calls)
    assert calls == []


def test_a_record_of_another_version_is_replaced_with_overwrite(tmp_path, calls):
    cfg = mini_config(tmp_path)
    _run(cfg, calls)
    path = Path(cfg.work_dir) / "train_cgnet" / records.RECORD
    path.write_text(json.dumps({"seconds": 3.0}))
    ran, _ = _run(cfg, calls, overwrite=True)
    assert ran == PLAN  # overwrite starts every selected step over
    assert records.read(path.parent)["complete"] == ["all"]


def test_an_interrupted_step_resumes_and_one_with_other_settings_starts_over(tmp_path, calls):
    cfg = mini_config(tmp_path)
    call = jobs_of(cfg, PLAN)[0].calls[0]
    folder = Path(cfg.work_dir) / "train_classifier"
    folder.mkdir(parents=True)
    records.write(folder, records.new("train_classifier", stage_settings(call, "train_classifier")))
    partial = folder / "last.pth"
    partial.write_text("half")
    interrupted = records.read(folder)["run"]
    ran, _ = _run(cfg, calls)  # same settings: resumed (the stage finds its last.pth)
    assert ran == PLAN and partial.is_file()
    record = records.read(folder)
    assert record["run"] == interrupted and record["complete"] == ["all"]

    # interrupted again, then run with another max_steps: the same trajectory continues (files kept)
    record["complete"] = []
    records.write(folder, record)
    ran, _ = _run(mini_config(tmp_path, **{"train_classifier.max_steps": 3}), calls)
    assert partial.is_file() and records.read(folder)["complete"] == ["all"]

    # an interrupted run with lr 0.01, now run with lr 0.5: started over, not resumed
    record = records.read(folder)
    records.write(folder, {**record, "complete": []})
    ran, _ = _run(mini_config(tmp_path, **{"train_classifier.max_steps": 3, "train_classifier.lr": 0.5}), calls)
    assert ran == PLAN and not partial.exists()
    record = records.read(folder)
    assert record["run"] != interrupted and record["settings"]["train_classifier.lr"] == 0.5


def test_pipeline_logs_stage_i_of_n_with_the_elapsed_time(tmp_path, calls, caplog, monkeypatch):
    monkeypatch.setattr(pipeline, "write_results", lambda cfg, jobs: {"steps": [j.step.name for j in jobs]})
    cfg = mini_config(tmp_path)
    with caplog.at_level("INFO", logger="caee.pipeline.runner"):
        result = pipeline.run(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "caee.pipeline.runner"]
    n = len(plan(cfg))
    assert result["steps"] == plan(cfg) and n == 9
    assert lines[0] == "stage 1 / 9: train_classifier done (elapsed 0:00:00)"
    assert lines[-1].startswith("stage 9 / 9: train_deeplab done (elapsed 0:")
    caplog.clear()
    with caplog.at_level("INFO", logger="caee.pipeline.runner"):
        pipeline.run(cfg, only=["cam_cgnet"])
    assert [r.getMessage().split(" finished")[0] for r in caplog.records] == ["stage 1 / 1: cam_cgnet"]


def test_selected_steps_and_the_table_refuse_stale_upstream_outputs(tmp_path, calls, monkeypatch):
    """`caee run --stages X` after a key of an unselected upstream step changed: X would run on (and
    the results table describe) outputs this config did not make, so both are refused, naming the
    step and the key; selecting the upstream step too runs both."""
    cfg = mini_config(tmp_path)
    _run(cfg, calls)
    changed = mini_config(tmp_path, **{"train_affinity.lr": 0.5, "pipeline.control": False})  # the steps of PLAN
    jobs = jobs_of(changed, PLAN)
    pick = lambda *names: [j for j in jobs if j.step.name in names]  # noqa: E731
    calls.clear()
    # two steps up: the pseudo labels' own record holds, but they were made from the outdated AffinityNet
    with pytest.raises(CaeeError, match=r"'train_deeplab' reads the outputs of 'pseudo_labels', .*\(its input "
                                        r"'train_affinity' is out of date: train_affinity.lr: 0.01 -> 0.5\)"):
        run_jobs(pick("train_deeplab"), context=jobs)
    # checked before anything runs: retraining the OC first would not make the CGNet current
    oc_jobs = jobs_of(mini_config(tmp_path, **{"train_classifier.lr": 0.5}), PLAN)
    with pytest.raises(CaeeError, match=r"'cam_cgnet' reads the outputs of 'train_cgnet', .*its input "
                                        r"'train_classifier' is out of date"):
        run_jobs([j for j in oc_jobs if j.step.name in ("train_classifier", "cam_cgnet")], context=oc_jobs)
    assert calls == []
    with pytest.raises(CaeeError, match=r"'pseudo_labels' reads the outputs of 'train_affinity', which do not "
                                        r"match this config \(train_affinity.lr: 0.01 -> 0.5\)"):
        run_jobs(pick("pseudo_labels"), context=jobs)
    assert calls == []
    run_jobs(pick("train_affinity", "pseudo_labels"), context=jobs)
    assert calls == ["train_affinity", "pseudo_labels"]
    monkeypatch.setattr(pipeline, "write_results", lambda cfg, jobs: {"rows": []})
    with pytest.raises(CaeeError, match=r"'results' reads the outputs of 'train_deeplab', which do not match this "
                                        r"config \(input.labels: '\w+' -> '\w+'\)"):
        pipeline.run(changed, only=["results"])
    assert pipeline.run(changed, only=["train_deeplab", "results"]) == {"rows": []}


# ---------------------------------------------------------------- a real miniature pipeline
# conftest.py's mini_pipeline: one finished pipeline (no control, CAMs in <work_dir>/my_cams, pseudo
# labels in <work_dir>/my_labels, DeepLab started from the CGNet), copied per test (copied_pipeline)


def test_the_shared_pipeline_ran_every_step(mini_pipeline):
    assert mini_pipeline.ran == plan(mini_pipeline.config()) == PLAN


def _records(work: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(work)): json.loads(p.read_text()) for p in sorted(work.rglob(records.RECORD))}


def test_a_stage_run_alone_with_overwrite_makes_the_pipeline_redo_it_and_what_follows(copied_pipeline, tmp_path):
    """`caee train-cgnet <cfg> train_cgnet.lr=<other> --overwrite`, then the pipeline with the config's
    lr: the CGNet and every step downstream of it run again (new run ids), the OC does not."""
    work, cfg = copied_pipeline.work, copied_pipeline.config()
    before = _records(work)
    path = save_config(cfg, tmp_path)
    assert cli.main(["train-cgnet", "--config", str(path), "train_cgnet.lr=0.05", "--overwrite"]) == 0
    alone = records.read(work / "train_cgnet")
    assert alone["settings"]["train_cgnet.lr"] == 0.05 and alone["run"] != before["train_cgnet"]["run"]
    assert alone["complete"] == ["all"]

    summary = run_jobs(jobs_of(cfg, plan(cfg)))
    downstream = ["train_cgnet", "cam_cgnet", "train_affinity", "pseudo_labels", "train_deeplab"]
    assert summary.ran == downstream and summary.skipped == ["train_classifier", "cam_classifier"]
    after = _records(work)
    for step, folder in zip(downstream, ["train_cgnet", "my_cams", "train_affinity", "my_labels",
                                         "train_deeplab"]):
        assert after[folder]["run"] not in (before[folder]["run"], alone["run"]), step
        assert after[folder]["complete"] == before[folder]["complete"], step
    assert after["train_cgnet"]["settings"]["train_cgnet.lr"] == 0.01
    assert after["my_cams"]["settings"]["input.weights"] == after["train_cgnet"]["run"]
    assert after["train_classifier"] == before["train_classifier"]  # the OC: untouched record
    assert after["cam_classifier"] == before["cam_classifier"]


def test_a_copied_work_dir_reruns_nothing_also_read_only(copied_pipeline):
    """`cp -r work other`, then the pipeline on the copy: no step runs and no record changes (paths in
    the work_dir are recorded relative to it); the same on a read-only copy (unless root, whom
    permissions do not stop: then the copy stays writable and only the 0 re-runs are checked)."""
    work, cfg = copied_pipeline.work, copied_pipeline.config()
    before = {p: p.read_bytes() for p in work.rglob(records.RECORD)}
    deeplab = records.read(work / "train_deeplab")["settings"]   # the init path: relative, and an input by its run id
    assert deeplab["train_deeplab.init"] == "{work_dir}/train_cgnet/model.pth"
    assert deeplab["input.train_deeplab.init"] == records.read(work / "train_cgnet")["run"]
    summary = run_jobs(jobs_of(cfg, plan(cfg)))
    assert summary.ran == [] and summary.skipped == PLAN
    assert {p: p.read_bytes() for p in work.rglob(records.RECORD)} == before

    read_only = os.geteuid() != 0
    modes = {p: p.stat().st_mode for p in [work, *work.rglob("*")]}
    if read_only:
        for p in modes:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        summary = run_jobs(jobs_of(cfg, plan(cfg)))
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert summary.ran == [] and summary.skipped == PLAN
    assert {p: p.read_bytes() for p in work.rglob(records.RECORD)} == before


def test_a_truncated_model_stops_the_step_reading_it_before_it_removes_anything(copied_pipeline):
    """train_cgnet/model.pth truncated to zero bytes, then a changed setting of the step that reads
    it (cam_cgnet): one CaeeError naming model.pth, and the CGNet CAM folder (its .npz files and its
    record) is untouched. train_cgnet itself is skipped: its record holds for the config."""
    work = copied_pipeline.work
    (work / "train_cgnet" / records.MODEL).write_bytes(b"")
    cams = work / "my_cams"
    before = {p.name: p.read_bytes() for p in cams.iterdir() if p.suffix in (".npz", ".json")}
    assert sum(n.endswith(".npz") for n in before) == 16
    cfg = copied_pipeline.config(**{"cam.scales": [1.0, 0.5]})
    summary = runner.Summary()
    with pytest.raises(CaeeError, match=r"train_cgnet/model\.pth: unreadable PyTorch checkpoint") as e:
        run_jobs(jobs_of(cfg, plan(cfg)), summary=summary)
    assert str(e.value).count("model.pth") >= 1 and e.value.__cause__ is None
    assert summary.skipped == ["train_classifier", "train_cgnet"] and summary.ran == ["cam_classifier"]
    assert {p.name: p.read_bytes() for p in cams.iterdir() if p.suffix in (".npz", ".json")} == before

    # a changed CGNet setting with only the CAMs selected: refused as stale before anything runs
    cfg = copied_pipeline.config(**{"train_cgnet.lr": 0.05})
    jobs = jobs_of(cfg, plan(cfg))
    with pytest.raises(CaeeError, match=r"'cam_cgnet' reads the outputs of 'train_cgnet', which do not match "
                                        r"this config \(train_cgnet.lr: 0.01 -> 0.05\)"):
        run_jobs([j for j in jobs if j.step.name == "cam_cgnet"], context=jobs)
    assert {p.name: p.read_bytes() for p in cams.iterdir() if p.suffix in (".npz", ".json")} == before
    assert (work / "train_cgnet" / records.MODEL).stat().st_size == 0
