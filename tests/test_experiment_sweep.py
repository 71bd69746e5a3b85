"""Sweep variants ``<overlay>@<tag>``: config validation, merged overrides, extra SSL steps and the
validation-only sweep table; the converged study YAMLs load."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from qgssl_monai.experiments.config import (
    ExperimentConfigError,
    base_of_qw,
    is_quality_guided,
    load_experiment,
    overlay_of,
)
from qgssl_monai.experiments.pipeline import ExperimentPipeline
from qgssl_monai.experiments.report import RunResult, sweep_table

REPO = Path(__file__).resolve().parents[1]


def _content(**extra: object) -> dict:
    return {
        "name": "sweep-test",
        "data": {"labeled": str(REPO / "data_manifests" / "demo.json")},
        "methods": ["sup", "pl_t", "pl_qw"],
        "networks": ["unet"],
        "seeds": [0, 1],
        "epochs": 2,
        "image_size": 32,
        **extra,
    }


def test_variants_map_to_their_overlay_and_merge_overrides(tmp_path: Path) -> None:
    assert overlay_of("pl_qw@lam1") == "pl_qw" and overlay_of("sup") == "sup"
    assert is_quality_guided("pl_qw@lam1") and not is_quality_guided("pl_t@x")
    assert base_of_qw("pl_qw@lam1") == "pl_t" and base_of_qw("mt_qw@tau0.5") == "mt"
    cfg = load_experiment(
        content=_content(
            sweep={"methods": ["pl_qw@lam1", "pl_qw@tau"]},
            overrides={"ssl": {"epoch_length": 3}, "method": {
                "pl_qw": {"unsup_weight": 0.25, "method#qw_mode": "plain"},
                "pl_qw@lam1": {"unsup_weight": 1.0},
                "pl_qw@tau": {"method#qw_mode": "thresholded", "method#qw_threshold": 0.5},
            }},
        ),
        base_dir=tmp_path,
    )  # fmt: skip
    assert cfg.ssl_overrides("pl_qw@lam1", "unet") == {"epoch_length": 3, "unsup_weight": 1.0, "method#qw_mode": "plain"}
    assert cfg.ssl_overrides("pl_qw@tau", "unet")["method#qw_threshold"] == 0.5
    assert cfg.ssl_overrides("pl_qw", "unet") == {"epoch_length": 3, "unsup_weight": 0.25, "method#qw_mode": "plain"}
    assert (cfg.sweep_networks, cfg.sweep_seeds) == (["unet"], [0])
    pipeline = ExperimentPipeline(cfg, tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}")
    steps = {step.key: step for step in pipeline.steps()}
    assert {"ssl:pl_qw@lam1:unet:0", "ssl:pl_qw@tau:unet:0"} <= set(steps)
    assert "ssl:pl_qw@lam1:unet:1" not in steps  # the sweep runs on its seeds only
    assert "quality:train" in steps["ssl:pl_qw@lam1:unet:0"].deps
    assert pipeline._ssl_files("pl_qw@lam1", "unet")[1] == "method/pl_qw.json"
    # the hashed step config carries the variant's settings
    assert steps["ssl:pl_qw@lam1:unet:0"].config["overrides"]["unsup_weight"] == 1.0
    assert steps["ssl:pl_qw:unet:0"].config["overrides"]["unsup_weight"] == 0.25


def test_sweep_validation_errors(tmp_path: Path) -> None:
    with pytest.raises(ExperimentConfigError, match=r"unknown \['nope@x'\]"):
        load_experiment(content=_content(sweep={"methods": ["nope@x"]}), base_dir=tmp_path)
    with pytest.raises(ExperimentConfigError, match="sweep.networks"):
        load_experiment(content=_content(sweep={"methods": ["pl_qw@a"], "networks": ["unetpp"]}), base_dir=tmp_path)
    with pytest.raises(ExperimentConfigError, match=r"overrides.method: \['mt@x'\]"):
        load_experiment(content=_content(overrides={"method": {"mt@x": {}}}), base_dir=tmp_path)


def test_sweep_table_ranks_candidates_by_validation_only() -> None:
    def run(method: str, seed: int, best_val: float, test: float) -> RunResult:
        return RunResult(method, "unet", seed, f"{method}{seed}", {"dsc_mean": test}, None, [(1, 0.1), (2, best_val), (3, best_val - 0.05)])

    results = [
        run("pl_qw", 0, 0.60, 0.90), run("pl_qw", 1, 0.99, 0.99),  # seed 1 is not a sweep seed: ignored
        run("pl_qw@lam1", 0, 0.65, 0.10),  # best on validation, worst on test: validation decides
        run("pl_qw@tau", 0, 0.62, 0.95),
    ]  # fmt: skip
    table = sweep_table(results, ["pl_qw@lam1", "pl_qw@tau"], ["unet"], [0], {"pl_qw@lam1": {"unsup_weight": 1.0}})
    rows = table.set_index("candidate")
    assert rows.index.tolist() == ["pl_qw", "pl_qw@lam1", "pl_qw@tau"]
    assert rows.loc["pl_qw", "val_dsc_best"] == pytest.approx(60.0) and rows.loc["pl_qw", "n"] == 1
    assert rows["selected"].tolist() == [False, True, False]
    assert rows.loc["pl_qw@lam1", "settings"] == "unsup_weight=1.0" and rows.loc["pl_qw", "settings"] == "defaults"


def test_method_overlays_using_g_are_exactly_the_quality_guided_names() -> None:
    # the report's guided / non-guided split must agree with the overlays that hand g to the method
    for overlay in sorted((REPO / "bundles" / "ssl_segmentation" / "configs" / "method").glob("*.json")):
        uses_g = "method#quality_net" in json.loads(overlay.read_text())
        assert is_quality_guided(overlay.stem) == uses_g, overlay.stem


@pytest.mark.parametrize("name", ["cvc2kvasir_25", "cvc2kvasir_100", "kvasir2cvc_25", "kvasir2cvc_100"])
def test_converged_study_yamls_load(name: str) -> None:
    cfg = load_experiment(REPO / "experiments" / "converged" / f"{name}.yaml")
    assert cfg.image_size >= 96 and cfg.seeds == [0, 1, 2] and cfg.networks == ["attention_unet"]
    assert cfg.methods == ["sup", "pl_t", "pl_qw", "mt", "mt_qw", "ict", "ict_qw", "cps", "cps_qw", "qar", "qar_qw", "fdpl", "fdpl_qw"]
    assert all(Path(p).is_file() for p in (cfg.data.labeled, cfg.data.unlabeled))
    assert cfg.sweep.methods and all("@" in m for m in cfg.sweep.methods)
    ssl = cfg.overrides["ssl"]
    assert ssl["early_stop_patience"] >= cfg.epochs  # the whole schedule runs
    assert str(ssl["ema#ramp_steps"]).startswith("$")  # EMA ramp scales with the schedule length
    assert pd.Series(cfg.methods).is_unique


def _study_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("converged_study", REPO / "scripts" / "converged_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_script_applies_sweep_winners_and_picks_second_stage_methods_by_validation() -> None:
    study = _study_script()
    path = REPO / "experiments" / "converged" / "cvc2kvasir_25.yaml"
    cfg = load_experiment(path)

    def run(method: str, network: str, seed: int, best_val: float, test: float) -> RunResult:
        return RunResult(method, network, seed, f"{method}{seed}", {"dsc_mean": test}, None, [(1, best_val)])

    results = [run("mt_qw", "attention_unet", 0, 0.50, 0.9), run("mt_qw@lam0.3", "attention_unet", 0, 0.55, 0.1),
               run("mt_qw@tau0.5", "attention_unet", 0, 0.52, 0.9), run("pl_qw", "attention_unet", 0, 0.60, 0.1),
               run("pl_qw@lam1", "attention_unet", 0, 0.58, 0.9)]  # fmt: skip
    swept, table = study.swept_config(cfg, results)
    assert swept.overrides["method"]["mt_qw"] == {"unsup_weight": 0.3}  # the validation winner's settings
    assert "pl_qw" not in swept.overrides["method"]  # the grid setting won: unchanged
    assert swept.ssl_overrides("mt_qw", "attention_unet")["unsup_weight"] == 0.3
    grid = [run("sup", "attention_unet", s, 0.9, 0.9) for s in range(3)]
    grid += [run("mt", "attention_unet", s, 0.6, 0.1) for s in range(3)] + [run("cps", "attention_unet", s, 0.5, 0.99) for s in range(3)]
    grid += [run("qar", "attention_unet", s, 0.7, 0.1) for s in range(3)] + [run("pl_qw", "attention_unet", s, 0.65, 0.99) for s in range(3)]
    assert study.best_by_validation(grid, cfg.methods, "attention_unet", guided=False) == "mt"  # not SUP, not by test
    assert study.best_by_validation(grid, cfg.methods, "attention_unet", guided=True) == "qar"
