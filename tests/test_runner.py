"""The step runner's markers (caee/pipeline/runner.py, caee/core/markers.py): same settings skip, a changed key
re-runs exactly the steps it affects (and those downstream), records without settings are refused
unless --overwrite, an interrupted run with other settings starts over. The stages are replaced by
a stub that writes each step's folders, so these tests train nothing."""
import json
from pathlib import Path

import pytest

from caee.core import markers

from caee.pipeline import run as pipeline

from caee.pipeline import runner
from caee.core.errors import CaeeError
from caee.pipeline.runner import jobs_of, run_jobs
from conftest import mini_config

PLAN = ["train_classifier", "train_cgnet", "cam_classifier", "cam_cgnet", "train_affinity", "pseudo_labels",
        "train_deeplab"]


@pytest.fixture
def calls(monkeypatch):
    """Replace the stage calls by a stub that writes a file into each folder the step owns."""
    made: list[str] = []

    def fake(job, call, k, nproc):
        made.append(job.step.name)
        for folder in job.writes[:1]:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"out{k}.txt").write_text(job.step.name)
        return None
    monkeypatch.setattr(runner, "_call_stage", fake)
    return made


def _run(cfg, calls, **kw):
    calls.clear()
    jobs = jobs_of(cfg, PLAN)
    summary = run_jobs(jobs, **kw)
    return list(calls), summary


def test_same_settings_skip_and_a_changed_key_reruns_exactly_what_it_affects(tmp_path, calls):
    cfg = mini_config(tmp_path)
    ran, _ = _run(cfg, calls)
    assert ran == PLAN
    record = json.loads((Path(cfg.work_dir) / "pipeline" / "cam_cgnet.done").read_text())
    assert record["stages"] == ["make_cam"] and record["settings"][0]["cam.source"] == "cgnet"
    assert set(record["upstream"]) == {"train_cgnet"} and record["fingerprint"] and record["run"]
    pl = json.loads((Path(cfg.work_dir) / "pipeline" / "pseudo_labels.done").read_text())
    assert set(pl["upstream"]) == {"cam_cgnet", "train_affinity"}

    ran, summary = _run(cfg, calls)
    assert ran == [] and summary.skipped == PLAN

    # a key read only by AffinityNet: it and what reads its output run again, nothing upstream
    ran, _ = _run(mini_config(tmp_path, **{"train_affinity.lr": 0.5}), calls)
    assert ran == ["train_affinity", "pseudo_labels", "train_deeplab"]
    # a CAM key: the CGNet CAMs and everything after them (not the OC CAMs: they are another step's)
    ran, _ = _run(mini_config(tmp_path, **{"train_affinity.lr": 0.5, "cam.scales": [1.0, 0.5]}), calls)
    assert ran == ["cam_classifier", "cam_cgnet", "train_affinity", "pseudo_labels", "train_deeplab"]
    # the OC: everything
    ran, _ = _run(mini_config(tmp_path, **{"train_affinity.lr": 0.5, "cam.scales": [1.0, 0.5],
                                           "train_classifier.lr": 0.5}), calls)
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


def test_a_marker_without_settings_is_refused_unless_overwrite(tmp_path, calls):
    cfg = mini_config(tmp_path)
    _run(cfg, calls)
    marker = Path(cfg.work_dir) / "pipeline" / "train_cgnet.done"
    marker.write_text(json.dumps({"seconds": 3.0}))  # what an older version wrote
    with pytest.raises(CaeeError, match="train_cgnet' records no settings.*--overwrite"):
        _run(cfg, calls)
    ran, _ = _run(cfg, calls, overwrite=True)
    assert ran == PLAN  # overwrite starts every selected step over
    assert "settings" in json.loads(marker.read_text())
    marker.write_text("{not json")
    with pytest.raises(CaeeError, match="train_cgnet.done is unreadable"):
        _run(cfg, calls)


def test_an_interrupted_run_with_other_settings_starts_over(tmp_path, calls):
    cfg = mini_config(tmp_path)
    job = jobs_of(cfg, PLAN)[0]
    markers.write_started(job.marker, runner.record_of(job, [job]))
    partial = Path(cfg.work_dir) / "train_classifier" / "last.pth"
    partial.parent.mkdir(parents=True)
    partial.write_text("half")
    _run(cfg, calls)  # same settings: resumed (the stage finds its last.pth)
    assert partial.is_file() and not markers.started_path(job.marker).exists()

    other = mini_config(tmp_path, **{"train_classifier.lr": 0.5})
    job = jobs_of(other, PLAN)[0]
    job.marker.unlink()
    markers.write_started(job.marker, runner.record_of(jobs_of(cfg, PLAN)[0], []))
    _run(other, calls)
    assert not partial.exists()  # the interrupted run had lr 0.01: not resumed with lr 0.5


def test_pipeline_logs_stage_i_of_n_with_the_elapsed_time(tmp_path, calls, caplog, monkeypatch):
    monkeypatch.setattr(pipeline, "write_results", lambda cfg, steps: {"steps": steps})
    cfg = mini_config(tmp_path)
    with caplog.at_level("INFO", logger="caee.pipeline.runner"):
        result = pipeline.run(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "caee.pipeline.runner"]
    n = len(pipeline.plan(cfg))
    assert result["steps"] == pipeline.plan(cfg) and n == 9
    assert lines[0] == "stage 1 / 9: train_classifier (elapsed 0:00:00)"
    assert lines[-1].startswith("stage 9 / 9: train_deeplab (elapsed 0:")
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
    changed = mini_config(tmp_path, **{"train_affinity.lr": 0.5})
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
    with pytest.raises(CaeeError, match=r"'pseudo_labels' reads the outputs of 'train_affinity', which were made "
                                        r"with other settings than this config \(train_affinity.lr: 0.01 -> 0.5\)"):
        run_jobs(pick("pseudo_labels"), context=jobs)
    assert calls == []
    run_jobs(pick("train_affinity", "pseudo_labels"), context=jobs)
    assert calls == ["train_affinity", "pseudo_labels"]
    monkeypatch.setattr(pipeline, "write_results", lambda cfg, names: {"rows": []})
    with pytest.raises(CaeeError, match=r"'results' reads the outputs of 'train_deeplab', which were made with "
                                        r"other settings than this config \(upstream step 'pseudo_labels' ran again"):
        pipeline.run(changed, only=["results"])
    assert pipeline.run(changed, only=["train_deeplab", "results"]) == {"rows": []}
