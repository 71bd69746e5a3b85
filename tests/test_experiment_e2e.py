"""``experiments/ci.yaml`` end to end through the real bundles on the demo data (embedded SQLite MLflow),
idempotent rerun, resume of an interrupted SSL run with the bundle's checkpoint, and the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from qgssl_monai.cli import main as qgssl_main
from qgssl_monai.experiments.config import ExperimentConfigError, load_experiment
from qgssl_monai.experiments.pipeline import run_experiment
from qgssl_monai.experiments.tracking import StepTracker, default_tracking_uri

REPO = Path(__file__).resolve().parents[1]
CI_YAML = REPO / "experiments" / "ci.yaml"

pytestmark = pytest.mark.slow


def test_shipped_experiments_validate() -> None:
    for name in ("demo", "ci", "paper_polyp", "paper_skin"):
        cfg = load_experiment(REPO / "experiments" / f"{name}.yaml")
        assert cfg.methods and cfg.networks and cfg.seeds
    paper = load_experiment(REPO / "experiments" / "paper_polyp.yaml")
    assert (paper.image_size, paper.epochs, paper.networks, paper.seeds) == (224, 200, ["swinunetr2d", "unetpp", "attention_unet"], [0, 1, 2])


def test_invalid_names_are_listed_against_the_overlays(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(CI_YAML.read_text().replace("methods: [sup, qar]", "methods: [sup, mean_teacher]").replace("epochs: 1\n", "epochs: 0\n", 1))
    with pytest.raises(ExperimentConfigError) as err:
        load_experiment(bad)
    message = str(err.value)
    assert str(bad) in message and "methods: unknown ['mean_teacher']; available: [" in message and "'mt_qw'" in message
    assert "epochs: expected a positive integer, got 0" in message


def test_ci_experiment_end_to_end(
    demo_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # anything written outside the output folder would show up here
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    out = tmp_path / "ci"
    cfg = load_experiment(CI_YAML, updates={"data": {"labeled": str(demo_manifest)}})
    assert run_experiment(cfg, out) == 0
    uri = default_tracking_uri(out)
    tracker = StepTracker(uri, cfg.name)
    keys = ["data:prepare", "quality:weak", "quality:train", "quality:evaluate", "ssl:sup:unet:0", "ssl:qar:unet:0"]
    runs = {k: tracker.step_runs(k) for k in keys}
    assert {k: [r.info.status for r in v] for k, v in runs.items()} == {k: ["FINISHED"] for k in keys}

    # the SSL runs carry what the report needs: params, curves, test metrics, artifacts (one run per step:
    # MONAI's MLflow handlers attached to the runner's run instead of opening their own)
    qar = runs["ssl:qar:unet:0"][0]
    params = qar.data.params
    assert params["method"] == "qar" and params["seed"] == "0" and params["image_size"] == "32"
    assert params["label_count"] == "28" and params["dataset"] == "demo" and params["lambda"] == "0.01"
    assert len(params["git_commit"]) in (40, 7) or params["git_commit"] == "unknown"
    per_image = pd.read_csv(out / "ssl" / "qar" / "unet" / "seed0" / "eval" / "test_metrics_per_image.csv")
    assert len(per_image) == 8
    assert qar.data.metrics["test_dsc_mean"] == pytest.approx(per_image["dice"].mean(), abs=1e-6)
    assert [step for step, _ in tracker.metric_history(qar.info.run_id, "val_dsc")] == [1]
    for curve in ("train_sup_loss", "train_unsup_loss", "train_unsup_weight", "train_quality_weight_mean"):
        assert tracker.metric_history(qar.info.run_id, curve), curve
    artifacts = set(tracker.artifact_names(qar.info.run_id))
    assert {"config", "metrics", "models"} <= artifacts
    assert tracker.artifact_names(qar.info.run_id, "models") == ["models/model.pt"]

    table = (out / "report" / "table1.md").read_text()
    dsc = {r.data.tags["qgssl_method"]: r.data.metrics["test_dsc_mean"] for r in (runs["ssl:sup:unet:0"][0], qar)}
    best = max(dsc, key=dsc.get)
    assert f"| {best} | **{100 * dsc[best]:.2f}**" in table
    html = (out / "report" / "index.html").read_text()
    assert "<table>" in html and "qar vs sup" in html
    for name in ("val_curves.png", "quality_scatter.png", "convergence.png", "real_predictions_scatter.png"):
        with Image.open(out / "report" / name) as image:
            assert image.format == "PNG"

    # g on the SSL networks' test predictions: one run per network after every SSL run, 8 test images x 2 models
    (real,) = tracker.step_runs("quality:real:unet")
    assert real.info.status == "FINISHED"
    scores = pd.read_csv(out / "quality" / "eval" / "real_predictions" / "unet" / "segmentation_scores.csv")
    assert sorted(set(scores["source"])) == ["qar_seed0", "sup_seed0"] and len(scores) == 16
    sup_scores = scores[scores["source"] == "sup_seed0"].sort_values("image")
    per_image_sup = pd.read_csv(out / "ssl" / "sup" / "unet" / "seed0" / "eval" / "test_metrics_per_image.csv")
    assert sup_scores["true_dice"].mean() == pytest.approx(per_image_sup["dice"].mean(), abs=0.02)  # same masks, same images
    bias = (scores["predicted_dice"] - scores["true_dice"]).mean()
    assert real.data.metrics["quality_real_bias"] == pytest.approx(bias, abs=1e-5)
    assert real.data.metrics["quality_real_n"] == 16
    real_table = pd.read_csv(out / "report" / "real_predictions.csv")
    assert real_table["method"].tolist() == ["all", "sup", "qar"] and real_table["n"].tolist() == [16, 8, 8]
    assert real_table.loc[0, "bias"] == pytest.approx(bias, abs=1e-5)
    assert "g on the SSL networks' test predictions" in html

    # idempotent: nothing runs again
    capsys.readouterr()
    assert run_experiment(cfg, out, dry_run=True) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert sorted(words[1] for words in listed if words[0] == "skip" and words[1] in keys) == sorted(keys)

    # an interrupted SSL run (status KILLED, test evaluation missing) resumes from its checkpoint in the same run
    tracker.client.set_terminated(qar.info.run_id, "KILLED")
    (out / "ssl" / "qar" / "unet" / "seed0" / "eval" / "test_metrics_per_image.csv").unlink()
    before = {k: runs[k][0].info.end_time for k in keys if k != "ssl:qar:unet:0"}
    assert qgssl_main(["experiment", "run", str(out / "experiment.yaml"), "--output", str(out), "--no-report"]) == 0
    printed = capsys.readouterr().out
    decisions = {words[1]: (words[0], line) for line in printed.splitlines() if len(words := line.split()) > 2 and words[1] in keys}
    assert decisions["ssl:qar:unet:0"][0] == "done" and decisions["ssl:qar:unet:0"][1].endswith("is KILLED")
    assert sorted(k for k, (action, _) in decisions.items() if action == "skip") == sorted(keys[:-1])
    (again,) = tracker.step_runs("ssl:qar:unet:0")
    assert again.info.run_id == qar.info.run_id and again.info.status == "FINISHED"
    assert (out / "ssl" / "qar" / "unet" / "seed0" / "bundle_args" / "train.json").read_text().count('"resume": true') == 1
    assert {k: tracker.step_runs(k)[0].info.end_time for k in before} == before  # finished steps untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ci"]  # no stray mlflow.db / mlruns in the cwd
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before


def test_prepare_manifest_holds_out_labels_and_adds_another_unlabeled_set(demo_manifest: Path, tmp_path: Path) -> None:
    import json

    import numpy as np

    from qgssl_monai.data.manifest import load_split, write_manifest
    from qgssl_monai.experiments.pipeline import prepare_manifest

    demo = json.loads(demo_manifest.read_text())
    mask = str(demo_manifest.parent / demo["training"][0]["label"])
    pool = [{"image": str(demo_manifest.parent / e["image"]), "label": mask} for e in demo["unlabeled"][:10]]
    other = write_manifest(tmp_path / "other" / "other.json", {"training": pool}, data_root=demo_manifest.parent, name="other")
    cfg = load_experiment(CI_YAML, updates={"data": {"labeled": str(demo_manifest), "unlabeled": str(other), "num_labeled": 5}})
    facts = prepare_manifest(cfg, tmp_path / "combined.json")
    assert facts == {"dataset": "demo", "unlabeled_dataset": "other", "label_count": 5, "unlabeled_count": 33,
                     "validation_count": 4, "test_count": 8}  # fmt: skip
    training = load_split(tmp_path / "combined.json", "training")
    original = load_split(demo_manifest, "training")
    kept = sorted(np.random.default_rng(0).permutation(len(original))[:5].tolist())
    assert [e["image"] for e in training] == [original[i]["image"] for i in kept]
    unlabeled = {e["image"] for e in load_split(tmp_path / "combined.json", "unlabeled")}
    assert unlabeled == {e["image"] for i, e in enumerate(original) if i not in kept} | {e["image"] for e in pool}
