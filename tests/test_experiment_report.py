"""The comparison report computed from hand-made MLflow runs: exact numbers and rendering."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from qgssl_monai.experiments.report import (
    PER_IMAGE_ARTIFACT,
    QUALITY_ARTIFACT,
    RunResult,
    first_epoch_reaching,
    improvements,
    load_quality_predictions,
    load_results,
    method_order,
    render_table,
    summary_table,
    write_report,
)
from qgssl_monai.experiments.tracking import StepTracker, default_tracking_uri

METHODS = ["sup", "mt", "qar", "mt_qw"]
IMAGES = [f"img_{i}.png" for i in range(6)]
# per-image test DSC of run (method, seed): a method offset + a seed offset + a fixed per-image pattern
OFFSET = {"sup": 0.60, "mt": 0.70, "mt_qw": 0.74, "qar": 0.72}
PATTERN = np.array([0.00, 0.05, -0.03, 0.02, 0.04, -0.01])
SEEDS = [0, 1, 2]


def per_image_dsc(method: str, seed: int) -> np.ndarray:
    jitter = np.array([0.0, 0.01, 0.0, -0.005, 0.003, 0.002]) * (seed + 1) * {"mt_qw": 2.0, "qar": 1.5}.get(method, 1.0)
    return OFFSET[method] + 0.01 * seed + PATTERN + jitter


def auroc_curve(seed: int) -> list[float]:
    return [0.5 + 0.05 * epoch + 0.01 * seed for epoch in range(4)]


def val_curve(method: str) -> list[float]:
    return {"sup": [0.2, 0.5, 0.58, 0.6], "mt": [0.3, 0.69, 0.7, 0.72], "mt_qw": [0.5, 0.73, 0.74, 0.75], "qar": [0.4, 0.6, 0.7, 0.71]}[method]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("report")
    uri = default_tracking_uri(out)
    tracker = StepTracker(uri, "report-test")
    for method in METHODS:
        for seed in SEEDS:
            key = f"ssl:{method}:unet:{seed}"
            run_id = tracker.create(key, {"qgssl_experiment": "report-test", "qgssl_kind": "ssl", "qgssl_step": key, "qgssl_step_hash": "h",
                                          "qgssl_method": method, "qgssl_network": "unet", "qgssl_seed": str(seed)})  # fmt: skip
            dsc = per_image_dsc(method, seed)
            frame = pd.DataFrame({"image": IMAGES, "dsc": dsc, "iou": dsc / (2 - dsc), "hd95": 1.0, "asd": 0.5})
            csv = out / f"{method}_{seed}" / Path(PER_IMAGE_ARTIFACT).name
            csv.parent.mkdir()
            frame.to_csv(csv, index=False)
            tracker.log_artifact(run_id, csv, str(Path(PER_IMAGE_ARTIFACT).parent))
            tracker.log_metrics(run_id, {"test_dsc_mean": float(dsc.mean()), "test_iou_mean": float((dsc / (2 - dsc)).mean())})
            for epoch, value in enumerate(val_curve(method), start=1):
                tracker.log_metrics(run_id, {"val_dsc": value + 0.001 * seed}, step=epoch)
                if method == "mt_qw":  # the quality-weight diagnostics the bundle's handlers log per epoch
                    hist = {f"quality_weight_hist_{k:02d}": v for k, v in enumerate([0.1, 0.2, 0.3, 0.4])}
                    tracker.log_metrics(run_id, {**hist, "val_pseudo_label_auroc": auroc_curve(seed)[epoch - 1]}, step=epoch)
            tracker.finish(run_id)
    # an unfinished run and a run of another step hash must both be ignored when hashes are given
    stale = tracker.create("ssl:sup:unet:9", {"qgssl_experiment": "report-test", "qgssl_kind": "ssl", "qgssl_step": "ssl:sup:unet:9",
                                              "qgssl_step_hash": "old", "qgssl_method": "sup", "qgssl_network": "unet", "qgssl_seed": "9"})  # fmt: skip
    tracker.log_metrics(stale, {"test_dsc_mean": 0.99, "test_iou_mean": 0.99})
    tracker.finish(stale)
    running = tracker.create("ssl:mt:unet:7", {"qgssl_experiment": "report-test", "qgssl_kind": "ssl", "qgssl_step": "ssl:mt:unet:7",
                                               "qgssl_step_hash": "h", "qgssl_method": "mt", "qgssl_network": "unet", "qgssl_seed": "7"})  # fmt: skip
    tracker.log_metrics(running, {"test_dsc_mean": 0.01, "test_iou_mean": 0.01})
    quality = tracker.create("quality:evaluate", {"qgssl_experiment": "report-test", "qgssl_kind": "quality_eval", "qgssl_step": "quality:evaluate", "qgssl_step_hash": "q"})
    pred_csv = out / Path(QUALITY_ARTIFACT).name
    pd.DataFrame({"true_dice": [0.1, 0.5, 0.9, 0.7], "predicted": [0.2, 0.45, 0.85, 0.75]}).to_csv(pred_csv, index=False)
    tracker.log_artifact(quality, pred_csv, str(Path(QUALITY_ARTIFACT).parent))
    tracker.finish(quality)
    return uri, out


def hashes() -> dict[str, str]:
    keys = {f"ssl:{m}:unet:{s}": "h" for m in METHODS for s in SEEDS}
    keys.update({"ssl:sup:unet:9": "h", "ssl:mt:unet:7": "h", "quality:evaluate": "q"})
    return keys


def test_method_order_puts_each_qw_after_its_base() -> None:
    assert method_order(["sup", "mt_qw", "pl_t", "mt", "qar", "pl_t_qw", "cps_qw"]) == [
        "sup", "pl_t", "pl_t_qw", "mt", "mt_qw", "qar", "cps_qw"
    ]  # fmt: skip


def test_table_numbers_bold_best_and_paired_test_are_exact(tracked: tuple[str, Path]) -> None:
    uri, _ = tracked
    results = load_results(uri, "report-test", hashes())
    assert sorted({(r.method, r.seed) for r in results}) == sorted((m, s) for m in METHODS for s in SEEDS)
    table = summary_table(results, METHODS, ["unet"])
    row = table[(table.method == "mt_qw") & (table.metric == "dsc")].iloc[0]
    seed_means = [per_image_dsc("mt_qw", s).mean() for s in SEEDS]
    assert row["mean"] == pytest.approx(np.mean(seed_means), abs=1e-12)
    assert row["se"] == pytest.approx(np.std(seed_means, ddof=1) / math.sqrt(3), abs=1e-12)
    assert row["n"] == 3
    assert table[table.best].method.tolist() == ["mt_qw", "mt_qw"]
    markdown = render_table(table, "markdown")
    expected_cell = f"**{100 * np.mean(seed_means):.2f} ± {100 * np.std(seed_means, ddof=1) / math.sqrt(3):.2f}**"
    assert expected_cell in markdown
    assert [line.split("|")[1].strip() for line in markdown.splitlines()[2:]] == ["sup", "mt", "mt_qw", "qar"]
    assert "\\textbf{" in render_table(table, "latex")
    csv = pd.read_csv(pd.io.common.StringIO(render_table(table, "csv")))
    assert csv.loc[csv.method == "mt_qw", "unet_dsc_best"].item() and not csv.loc[csv.method == "sup", "unet_dsc_best"].item()

    gains = improvements(results, METHODS, ["unet"], "wilcoxon").set_index("comparison")
    assert gains.index.tolist() == ["mt_qw vs mt", "qar vs mt"]  # QAR against the best baseline (mt)
    # n = images: each image's DSC is averaged over the 3 seeds before the signed-rank test
    ours = np.mean([per_image_dsc("mt_qw", s) for s in SEEDS], axis=0)
    theirs = np.mean([per_image_dsc("mt", s) for s in SEEDS], axis=0)
    expected = stats.wilcoxon(ours, theirs)
    row = gains.loc["mt_qw vs mt"]
    assert (row["n_images"], row["n_seeds"], row["kind"]) == (6, 3, "vs base")
    assert row["p_value"] == pytest.approx(expected.pvalue, rel=1e-9)
    assert row["statistic"] == pytest.approx(expected.statistic)
    pooled = stats.wilcoxon(np.concatenate([per_image_dsc("mt_qw", s) for s in SEEDS]), np.concatenate([per_image_dsc("mt", s) for s in SEEDS]))
    assert not np.isclose(pooled.pvalue, expected.pvalue)  # seed x image pooling would give another answer
    mt_means = [per_image_dsc("mt", s).mean() for s in SEEDS]
    assert row["delta_dsc"] == pytest.approx(100 * (np.mean(seed_means) - np.mean(mt_means)))  # DSC points
    assert row["mean_diff"] == pytest.approx(100 * (ours - theirs).mean())
    deltas = [100 * (a - b) for a, b in zip(seed_means, mt_means)]
    assert row["seed_deltas"] == " / ".join(f"{d:+.2f}" for d in deltas)
    assert row["seeds_better"] == f"{sum(d > 0 for d in deltas)}/3"
    ttest = improvements(results, METHODS, ["unet"], "ttest").set_index("comparison")
    qar = np.mean([per_image_dsc("qar", s) for s in SEEDS], axis=0)
    assert ttest.loc["qar vs mt", "p_value"] == pytest.approx(stats.ttest_rel(qar, theirs).pvalue, rel=1e-9)
    assert ttest.loc["qar vs mt", "kind"] == "vs best non-guided"


def test_unfinished_and_stale_runs_are_ignored(tracked: tuple[str, Path]) -> None:
    uri, _ = tracked
    current = {r.seed for r in load_results(uri, "report-test", {**hashes(), "ssl:sup:unet:9": "new"}, with_details=False)}
    assert current == {0, 1, 2}  # seed 7 is RUNNING, seed 9 has another step hash
    assert 9 in {r.seed for r in load_results(uri, "report-test", None, with_details=False)}


def test_convergence_epoch() -> None:
    curve = [(1, 0.30), (2, 0.69), (3, 0.70), (4, 0.72)]
    assert first_epoch_reaching(curve, 0.96) == 3  # threshold 0.96 * 0.72 = 0.6912: epoch 2 (0.69) misses it
    assert first_epoch_reaching(curve, 0.95) == 2
    assert first_epoch_reaching(curve, target=0.71) == 4
    assert first_epoch_reaching(curve, target=0.9) is None
    assert first_epoch_reaching([], 0.96) is None


def test_report_renders_html_and_valid_pngs(tracked: tuple[str, Path]) -> None:
    uri, out = tracked
    results = load_results(uri, "report-test", hashes())
    predictions = load_quality_predictions(uri, "report-test", hashes())
    assert predictions["predicted"].tolist() == [0.2, 0.45, 0.85, 0.75]
    page = write_report(out / "report", experiment_name="report-test", methods=METHODS, networks=["unet"], results=results,
                        quality_predictions=predictions)  # fmt: skip
    text = page.read_text()
    assert "<table>" in text and "<b>" in text and text.count("data:image/png;base64,") == 5
    assert "Pearson r = " in text
    for name in ("val_curves.png", "quality_scatter.png", "convergence.png", "sup_val_curve.png", "diagnostics.png"):
        with Image.open(out / "report" / name) as image:
            image.verify()
            assert image.format == "PNG"
    conv = pd.read_csv(out / "report" / "convergence.csv").set_index("method")
    assert conv.loc["mt_qw", "e_val_mean"] == 2.0 and conv.loc["sup", "e_val_mean"] == 3.0
    for name in ("table1.md", "table1.csv", "table1.tex", "improvements.csv"):
        assert (out / "report" / name).stat().st_size > 0
    plateau = pd.read_csv(out / "report" / "plateau.csv").set_index("method")
    # 4 epochs: best up to epoch floor(0.8 * 4) = 3 vs best at the end, mean over seeds (val + 0.001 * seed)
    assert plateau.loc["sup", "gain_last_20"] == pytest.approx(100 * (0.60 - 0.58))
    assert plateau.loc["sup", "best_at_end"] == pytest.approx(100 * (0.60 + 0.001))
    assert plateau.loc["mt_qw", "gain_last_20"] == pytest.approx(1.0)
    assert not plateau.loc["sup", "plateaued"] and not plateau.loc["qar", "gain_last_20"] < 0.99
    seeds = pd.read_csv(out / "report" / "seeds.csv").set_index("method")
    sup_means = [100 * per_image_dsc("sup", s).mean() for s in SEEDS]
    assert seeds.loc["sup", "seed1"] == pytest.approx(sup_means[1])
    assert seeds.loc["sup", "sd"] == pytest.approx(np.std(sup_means, ddof=1))
    assert seeds.loc["sup", "spread"] == pytest.approx(max(sup_means) - min(sup_means))
    diagnostics = pd.read_csv(out / "report" / "diagnostics.csv").set_index("method")
    assert diagnostics.index.tolist() == ["mt_qw"]
    assert diagnostics.loc["mt_qw", "auroc_last"] == pytest.approx(np.mean([auroc_curve(s)[-1] for s in SEEDS]))
    assert diagnostics.loc["mt_qw", "auroc_mean"] == pytest.approx(np.mean([np.mean(auroc_curve(s)) for s in SEEDS]))


def test_reduced_method_set_on_a_second_network_compares_with_the_best_baseline() -> None:
    # net "a" ran everything; net "b" only sup, mt, pl_qw and qar (as in the real-data study)
    dice = {("sup", "a"): 0.50, ("pl_t", "a"): 0.40, ("pl_qw", "a"): 0.45, ("mt", "a"): 0.52, ("qar", "a"): 0.49,
            ("sup", "b"): 0.60, ("mt", "b"): 0.55, ("pl_qw", "b"): 0.58, ("qar", "b"): 0.61}  # fmt: skip
    results = []
    for (method, network), base in dice.items():
        for seed in range(2):
            per_image = pd.DataFrame({"image": [f"i{k}" for k in range(4)], "dsc": [base + 0.01 * k + 0.001 * seed for k in range(4)]})
            results.append(
                RunResult(method, network, seed, f"{method}{network}{seed}", {"dsc_mean": float(per_image.dsc.mean())}, per_image)
            )
    table = improvements(results, ["sup", "pl_t", "pl_qw", "mt", "qar"], ["a", "b"], "wilcoxon")
    rows = {(r.comparison, r.network): r for r in table.itertuples()}
    # on "a" PL-QW meets its base (pl_t) and the best non-guided method (mt) as well
    assert set(rows) == {("pl_qw vs pl_t", "a"), ("pl_qw vs mt", "a"), ("qar vs mt", "a"), ("pl_qw vs sup", "b"), ("qar vs sup", "b")}
    assert rows[("pl_qw vs sup", "b")].delta_dsc == pytest.approx(100 * (0.58 - 0.60))
    assert (rows[("qar vs mt", "a")].n_images, rows[("qar vs mt", "a")].n_seeds) == (4, 2)


def test_real_predictions_table_pooled_and_per_method() -> None:
    from qgssl_monai.experiments.report import real_predictions_table

    scores = pd.DataFrame({
        "network": ["unet"] * 6,
        "source": ["mt_qw_seed0", "mt_qw_seed1", "sup_seed0", "sup_seed0", "mt_seed2", "mt_seed2"],
        "image": [f"i{k}" for k in range(6)],
        "true_dice": [0.9, 0.8, 0.3, 0.75, 0.5, 0.95],
        "predicted": [0.95, 0.7, 0.6, 0.9, 0.55, 0.9],
    })  # fmt: skip
    table = real_predictions_table(scores, ["sup", "mt_qw", "mt"])
    assert table["method"].tolist() == ["all", "sup", "mt", "mt_qw"]  # each *_qw after its base, seeds pooled
    assert real_predictions_table(scores)["method"].tolist() == ["all", "mt", "mt_qw", "sup"]
    assert table["n"].tolist() == [6, 2, 2, 2]
    err = scores["predicted"] - scores["true_dice"]
    assert table.loc[0, "bias"] == pytest.approx(err.mean())
    assert table.loc[0, "fraction_overestimated"] == pytest.approx(4 / 6)
    # good (>= 0.7): scores 0.95, 0.7, 0.9, 0.9 vs bad 0.6, 0.55: every pair ordered right
    assert table.loc[0, "auroc_dice_0_7"] == pytest.approx(1.0)
    assert table.loc[1, "bias"] == pytest.approx((0.3 + 0.15) / 2)
    assert math.isnan(table.loc[3, "auroc_dice_0_7"])  # mt_qw: both masks good, AUROC undefined


def test_report_shows_real_predictions(tmp_path: Path) -> None:
    scores = pd.DataFrame({"network": ["unet"] * 4, "source": ["sup_seed0"] * 2 + ["mt_seed0"] * 2, "image": list("abcd"),
                           "true_dice": [0.2, 0.9, 0.6, 0.8], "predicted": [0.5, 0.85, 0.7, 0.9]})  # fmt: skip
    page = write_report(tmp_path, experiment_name="x", methods=["sup", "mt"], networks=["unet"], results=[], real_predictions=scores)
    html = page.read_text()
    tables_without = write_report(tmp_path / "without", experiment_name="x", methods=["sup", "mt"], networks=["unet"], results=[]).read_text().count("<table>")
    assert "g on the SSL networks' test predictions" in html and html.count("<table>") == tables_without + 1
    assert (tmp_path / "real_predictions.md").read_text().splitlines()[2].startswith("| unet | all | 4 |")
    with Image.open(tmp_path / "real_predictions_scatter.png") as png:
        assert png.format == "PNG"
    empty = write_report(tmp_path / "none", experiment_name="x", methods=["sup"], networks=["unet"], results=[])
    assert "no quality:real run found" in empty.read_text()


def test_scope_section_shows_the_summary_and_gs_own_check(tmp_path: Path) -> None:
    """``report.summary`` and the quality evaluation run's held-out / image-zeroing metrics lead the report."""
    from qgssl_monai.experiments.report import load_quality_metrics, scope_markdown

    uri = default_tracking_uri(tmp_path)
    tracker = StepTracker(uri, "scope-test")
    tags = {"qgssl_experiment": "scope-test", "qgssl_kind": "quality_eval", "qgssl_step": "quality:evaluate"}
    old = tracker.create("quality:evaluate", {**tags, "qgssl_step_hash": "old"})
    tracker.log_metrics(old, {"quality_heldout_pearson": 0.1})
    tracker.finish(old)
    run = tracker.create("quality:evaluate", {**tags, "qgssl_step_hash": "q"})
    tracker.log_metrics(run, {"quality_heldout_n": 160, "quality_heldout_pearson": 0.8766, "quality_heldout_mae": 0.0612,
                              "quality_image_zeroing_mae_image_zeroed": 0.3012, "quality_image_zeroing_mae_increase": 0.24})  # fmt: skip
    tracker.finish(run)
    metrics = load_quality_metrics(uri, "scope-test", {"quality:evaluate": "q"})
    assert metrics["quality_heldout_pearson"] == pytest.approx(0.8766)
    assert load_quality_metrics(uri, "scope-test", {"quality:evaluate": "none"}) == {}

    summary = "Synthetic data; differences within seed noise are not evidence (see docs/RESULTS.md)."
    text = scope_markdown(summary, metrics)
    assert text.startswith(summary + "\n\n| quality predictor g | value |")
    assert "| held-out corrupted test masks | 160 |" in text and "| Pearson r (predicted vs true Dice) | 0.877 |" in text
    assert "| MAE increase when the image is zeroed | +0.240 |" in text
    assert scope_markdown("", None) == ""
    assert scope_markdown("  ", {}) == ""

    page = write_report(tmp_path / "report", experiment_name="scope-test", methods=["sup"], networks=["unet"], results=[],
                        summary=summary, quality_metrics=metrics)  # fmt: skip
    html = page.read_text()
    assert html.index(f"<p>{summary}</p>") < html.index("<td>Pearson r (predicted vs true Dice)</td><td>0.877</td>") < html.index("Table 1")
    assert (tmp_path / "report" / "scope.md").read_text() == text
