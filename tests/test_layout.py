"""caee/core/layout.py: every path key set alone is honoured by every later stage and the results table."""
import json
from pathlib import Path

import pytest

from caee.pipeline import run as pipeline
from caee.core import records
from caee.core.layout import Layout, crf_dir
from caee.pipeline.runner import jobs_of, upstream_of
from caee.stages import table
from caee.stages.table import control_config
from conftest import mini_config

X = "/elsewhere/x"

# key -> the answers that must become X (every other answer keeps its default): Layout's, and each
# row's inputs ("<stage>.<input>") and outputs ("<stage>") in the table of stages
HONOURED = {
    "cam.out_dir": ["cam_dir", "make_cam", "train_affinity.cams", "make_pseudo_labels.cams", "eval_dir",
                    "train_irn.cams", "make_irn_labels.cams"],
    "cam.weights": ["cam_weights", "make_cam.weights"],
    "train_cgnet.oc_weights": ["train_cgnet.oc"],
    "train_affinity.cam_dir": ["train_affinity.cams"],
    "pseudo_labels.cam_dir": ["make_pseudo_labels.cams"],
    "pseudo_labels.weights": ["make_pseudo_labels.affinitynet"],
    "pseudo_labels.out_dir": ["make_pseudo_labels", "train_deeplab.labels"],
    "irn.cam_dir": ["train_irn.cams", "make_irn_labels.cams"],
    "irn.weights": ["make_irn_labels.irn"],
    "irn.out_dir": ["make_irn_labels"],
    "train_deeplab.label_dir": ["train_deeplab.labels"],
    "eval.dir": ["eval_dir"],
    "eval.out": ["eval_out"],
}
QUESTIONS = sorted({q for qs in HONOURED.values() for q in qs})


def _answers(layout: Layout) -> dict[str, Path]:
    out = {q: getattr(layout, q)() for q in ("cam_dir", "cam_weights", "eval_dir", "eval_out")}
    for row in table.STAGES.values():
        out.update({f"{row.name}.{name}": path for name, (_, path) in row.input_paths(layout).items()})
        if row.output is not None:
            out[row.name] = row.output(layout)
    return out


@pytest.mark.parametrize("key", sorted(HONOURED))
def test_each_path_key_alone_changes_exactly_its_paths(tmp_path, key):
    default = _answers(Layout(mini_config(tmp_path)))
    cfg = mini_config(tmp_path, **{key: X})
    now = _answers(Layout(cfg))
    follows_folder = ["eval_out"] if "eval_dir" in HONOURED[key] else []  # named after the evaluated folder
    assert {q for q in now if now[q] != default[q]} == set(HONOURED[key] + follows_folder)
    assert all(now[q] == Path(X) for q in HONOURED[key])
    if follows_folder:
        assert now["eval_out"] == Path(cfg.work_dir) / "eval" / "x_train.json"
    # the control run and the OC CAMs never take the main run's explicit folders
    control = Layout(control_config(cfg), derived_only=True)
    assert control.cam_dir("cgnet") == Path(cfg.work_dir) / "control" / "cam_cgnet"
    assert Layout(cfg).cam_dir("classifier") == Path(cfg.work_dir) / "cam_classifier"


def test_defaults_follow_work_dir(tmp_path):
    layout = Layout(mini_config(tmp_path))
    work = Path(layout.cfg.work_dir)
    assert layout.cam_dir() == work / "cam_cgnet" and crf_dir(layout.cam_dir(), 4) == work / "cam_cgnet_crf_4"
    assert crf_dir(work / "cam_cgnet", 24.0) == work / "cam_cgnet_crf_24"
    assert layout.cam_weights("classifier") == work / "train_classifier" / "model.pth"
    labels = table.stage("make_pseudo_labels").output(layout)
    assert labels == work / "pseudo_labels" == table.stage("train_deeplab").input(layout.cfg, "labels")
    assert layout.predictions("val") == work / "train_deeplab" / "pred_val"
    assert layout.predictions("lists/my.txt", crf=True) == work / "train_deeplab" / "pred_my_crf"
    assert layout.deeplab_results() == work / "train_deeplab" / "results_val.json"
    assert layout.eval_out() == work / "eval" / "cam_cgnet_train.json"
    assert layout.step_configs() == work / "pipeline"  # the configs of steps run under torchrun


def test_the_steps_read_and_write_what_the_layout_says(tmp_path):
    """A CAM folder set by cam.out_dir is what the CGNet CAM step writes and what AffinityNet and
    the random walk read, so they are its downstream steps."""
    cams, labels = tmp_path / "my_cams", tmp_path / "my_labels"
    cfg = mini_config(tmp_path, **{"cam.out_dir": str(cams), "pseudo_labels.out_dir": str(labels)})
    jobs = {j.step.name: j for j in jobs_of(cfg, pipeline.plan(cfg))}
    assert cams in jobs["cam_cgnet"].writes and cams not in jobs["cam_classifier"].writes
    assert [c.cam.out_dir for c in jobs["cam_control"].calls] == [str(Path(cfg.work_dir) / "control" / "cam_cgnet")]
    context = list(jobs.values())
    assert [j.step.name for j in upstream_of(jobs["train_affinity"], context)] == ["cam_cgnet"]
    assert [j.step.name for j in upstream_of(jobs["pseudo_labels"], context)] == ["cam_cgnet", "train_affinity"]
    assert [j.step.name for j in upstream_of(jobs["train_deeplab"], context)] == ["pseudo_labels"]


def test_an_init_path_naming_a_steps_output_makes_that_step_upstream(tmp_path):
    cfg = mini_config(tmp_path, **{"train_deeplab.init": "{work_dir}/train_cgnet/model.pth"})
    context = jobs_of(cfg, pipeline.plan(cfg))
    assert [j.step.name for j in upstream_of(context[-1], context)] == ["train_cgnet", "pseudo_labels"]


def test_a_pipeline_with_cam_out_dir_and_pseudo_labels_out_dir_set_uses_them_everywhere(mini_pipeline):
    """conftest.py's miniature pipeline sets cam.out_dir=<work_dir>/my_cams and
    pseudo_labels.out_dir=<work_dir>/my_labels: every step writes and reads those folders."""
    work = mini_pipeline.work
    cams, labels = work / "my_cams", work / "my_labels"
    assert len(list(cams.glob("*.npz"))) == 16 and records.read(cams)["complete"] == ["train"]
    assert not (work / "cam_cgnet").exists() and records.read(work / "cam_classifier")["complete"] == ["train"]
    # AffinityNet made its la / ha CRF cell tables next to the CAM folder it read
    assert len(list(work.glob("my_cams_cells_4_24_s*"))) == 1 and not list(work.glob("cam_cgnet_*"))
    assert records.read(labels)["complete"] == ["train"] and (labels / "log.txt").is_file()
    assert not (work / "pseudo_labels").exists()
    # the records name their inputs by run id: the folders set by the keys are the ones read
    assert records.read(labels)["settings"]["input.cams"] == records.read(cams)["run"]
    assert records.read(work / "train_deeplab")["settings"]["input.labels"] == records.read(labels)["run"]
    hist = json.loads((work / "train_deeplab" / "label_histogram.json").read_text())
    assert hist["label_dir"] == str(labels)
    folders = {r["output"]: r["folder"] for r in mini_pipeline.result["rows"]}
    assert folders["CGNet CAM"] == str(cams) and folders["pseudo labels"] == str(labels)
    assert folders["CGNet CAM + CRF (alpha 4)"] == str(crf_dir(cams, 4))
    assert folders["OC CAM"] == str(work / "cam_classifier")


def test_the_results_table_finds_folders_given_with_work_dir(copied_pipeline):
    from caee.pipeline.results import measure

    work = copied_pipeline.work
    (work / "cams").symlink_to(work / "my_cams")
    cfg = copied_pipeline.config(**{"cam.out_dir": "{work_dir}/cams"})
    rows = {r["output"]: r for r in measure(cfg)}
    assert rows["CGNet CAM"]["folder"] == str(work / "cams")
