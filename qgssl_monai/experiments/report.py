"""The comparison report of an experiment, computed from MLflow only (``MlflowClient.search_runs``,
metric histories and logged artifacts; never files of the output folder).

Written to ``<output>/report/``:

* ``table1.md`` / ``table1.csv`` / ``table1.tex`` — the paper's Table 1 layout: one row per method (each
  baseline followed by its ``*_qw`` variant), columns network x {DSC, IoU}, ``mean ± s.e.`` in percent over
  seeds (per-seed value: the run's mean test DSC / IoU; s.e. = sample std (ddof=1) / sqrt(n); a single seed
  shows no ±), the best mean of each column in bold;
* ``improvements.md`` / ``.csv`` — every ``*_qw`` against its base method and QAR against the best
  non-quality-guided method of each network: difference of mean test DSC and a **paired test over
  per-image test DSC**: for every seed present in both methods the test images are paired by name, pooled
  over seeds, and compared with the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided; default)
  or the paired t-test (``scipy.stats.ttest_rel``), per the experiment's ``report.paired_test``;
* ``convergence.md`` / ``.csv`` — e_val: the first epoch whose validation DSC reaches
  ``convergence_fraction`` (default 0.96) of the run's best validation DSC (or the absolute
  ``target_val_dsc`` when set; empty when never reached), mean over seeds;
* ``val_curves.png`` (validation DSC per epoch, mean over seeds, one panel per network),
  ``quality_scatter.png`` (predicted quality vs true Dice on the test set, Pearson r and MAE — the paper's
  Fig. 2), ``convergence.png`` (e_val per method);
* ``real_predictions.md`` / ``.csv`` + ``real_predictions_scatter.png`` — g on the test predictions of the
  trained SSL networks (the ``quality:real:<network>`` runs; none of them is in g's training mix): per network,
  pooled and per method, n, Pearson, Spearman, MAE, mean bias (predicted - true), fraction over-estimated and
  AUROC for "true Dice >= 0.7";
* ``scope.md`` — the experiment's ``report.summary`` paragraph (what the run can and cannot show) and g's
  own check from the quality evaluation run: Pearson r and MAE on held-out corrupted test masks, and how much
  the MAE rises when the image channels are zeroed (a g that reads the image gets clearly worse);
* ``index.html`` — everything above in one self-contained page (images embedded as base64 PNG).
"""

from __future__ import annotations

import base64
import contextlib
import html
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from qgssl_monai.experiments.config import base_of_qw, is_quality_guided
from qgssl_monai.data.manifest import natural_key
from qgssl_monai.experiments.tracking import TAG_EXPERIMENT, TAG_KIND, TAG_STEP, TAG_STEP_HASH
from qgssl_monai.metrics import mean_se as metrics_mean_se

__all__ = [
    "PER_IMAGE_ARTIFACT",
    "QUALITY_ARTIFACT",
    "REAL_PREDICTIONS_ARTIFACT",
    "RunResult",
    "mean_se",
    "method_order",
    "load_results",
    "load_quality_predictions",
    "load_real_predictions",
    "real_predictions_table",
    "load_quality_metrics",
    "scope_markdown",
    "summary_table",
    "render_table",
    "paired_test",
    "seed_averaged_pairs",
    "seed_table",
    "improvements",
    "first_epoch_reaching",
    "convergence_table",
    "plateau_table",
    "diagnostics_table",
    "sweep_table",
    "write_report",
]

logger = logging.getLogger(__name__)

#: per-image test metrics CSV logged on every SSL run (columns image, dsc, iou, hd95, asd)
PER_IMAGE_ARTIFACT = "metrics/test_per_image.csv"
#: predicted quality vs true Dice on the test set, logged on the quality evaluation run (columns true_dice, predicted)
QUALITY_ARTIFACT = "quality/test_predictions.csv"
#: g on the SSL networks' test predictions, logged on each ``quality:real:<network>`` run
#: (columns network, source = ``<method>_seed<k>``, image, true_dice, predicted)
REAL_PREDICTIONS_ARTIFACT = "quality/real_predictions.csv"
REAL_METRICS = ("n", "pearson", "spearman", "mae", "bias", "fraction_overestimated", "auroc_dice_0_7")
METRICS = ("dsc", "iou")
#: per-epoch metrics of the quality-weight diagnostics (qgssl_monai.handlers.quality_stats) read into the report
DIAGNOSTIC_PREFIXES = ("quality_weight_", "val_pseudo_label_")
#: the schedule counts as converged when the last ``1 - PLATEAU_AT`` of the epochs move the best validation
#: DSC by less than ``PLATEAU_POINTS`` DSC points
PLATEAU_AT, PLATEAU_POINTS = 0.8, 1.0


@dataclass
class RunResult:
    """One finished SSL run as read back from MLflow."""

    method: str
    network: str
    seed: int
    run_id: str
    test: dict[str, float]
    per_image: pd.DataFrame | None = None
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    #: per-epoch diagnostics of quality-guided runs: metric name -> [(epoch, value)] (``quality_weight_*``,
    #: ``val_pseudo_label_*``)
    diagnostics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """:func:`qgssl_monai.metrics.mean_se` (s.e. = sd(ddof=1) / sqrt(n), 0 for one value); nan, nan when empty."""
    values = [float(v) for v in values]
    return metrics_mean_se(values) if values else (math.nan, math.nan)


def method_order(methods: Sequence[str]) -> list[str]:
    """Each baseline followed by its ``*_qw`` variant (``[sup, pl_t, pl_t_qw, ..., qar, qar_qw]``);
    a ``*_qw`` whose base is absent keeps its own place."""
    ordered: list[str] = []
    for method in methods:
        if method in ordered:
            continue
        base = base_of_qw(method)
        if base is not None and base in methods:
            continue  # placed right after its base
        ordered.append(method)
        ordered += [m for m in methods if m not in ordered and base_of_qw(m) == method]
    return ordered


@contextlib.contextmanager
def _mlflow_artifact_bars_off() -> Iterator[None]:
    """No MLflow "Downloading artifacts" bar per file inside the block (the report draws one bar per step).

    ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` is read by MLflow at every download; it is restored afterwards.
    """
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    name = MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name
    saved = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _download_csv(client: Any, run_id: str, artifact: str) -> pd.DataFrame | None:
    try:
        with tempfile.TemporaryDirectory() as tmp, _mlflow_artifact_bars_off():
            return pd.read_csv(client.download_artifacts(run_id, artifact, tmp))
    except Exception as err:  # missing artifact: the report shows what exists
        logger.warning("run %s has no artifact %s (%s)", run_id, artifact, err)
        return None


def _finished_runs(tracking_uri: str, experiment_name: str, kind: str) -> list[Any]:
    """FINISHED runs of one step kind, newest first (``MlflowClient.search_runs``, all pages).

    The client is used rather than ``mlflow.search_runs`` because setting the global tracking URI also sets
    ``MLFLOW_TRACKING_URI``, which MONAI's ``MLFlowHandler`` prefers over its own ``tracking_uri``.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    query = (
        f"tags.{TAG_EXPERIMENT} = '{experiment_name}' and tags.{TAG_KIND} = '{kind}' and attributes.status = 'FINISHED'"
    )
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _select_latest(runs: Sequence[Any], step_hashes: Mapping[str, str] | None) -> list[Any]:
    """Latest FINISHED run per step key (``runs`` newest first), only the current plan's (key, hash) pairs when given."""
    chosen: dict[str, Any] = {}
    for run in runs:
        tags = run.data.tags
        key = tags.get(TAG_STEP)
        if step_hashes is not None and step_hashes.get(key) != tags.get(TAG_STEP_HASH):
            continue
        chosen.setdefault(key, run)
    return list(chosen.values())


def load_results(
    tracking_uri: str,
    experiment_name: str,
    step_hashes: Mapping[str, str] | None = None,
    with_details: bool = True,
    progress: bool | None = None,
) -> list[RunResult]:
    """FINISHED SSL runs of the experiment (latest per step; only current step hashes when given).

    Each run must carry tags ``qgssl_method``, ``qgssl_network``, ``qgssl_seed`` (tags, not params: the
    bundle logs its own ``method`` param, e.g. ``mt-qw`` for the ``mt_qw`` overlay) and metrics ``test_dsc_mean``,
    ``test_iou_mean`` (``test_*`` metrics are all read); details are the per-image CSV artifact and the
    ``val_dsc`` history. ``progress``: one tqdm bar over the runs (None: only on a terminal).
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    results = []
    runs = _select_latest(_finished_runs(tracking_uri, experiment_name, "ssl"), step_hashes)
    # tqdm: disable=None hides the bar when stderr is not a terminal; no bar for the quick summary-only read
    disable = True if not with_details else (None if progress is None else not progress)
    for run in tqdm(runs, desc="reading SSL runs from MLflow", unit="run", disable=disable):
        tags, metrics = run.data.tags, run.data.metrics
        result = RunResult(
            method=tags["qgssl_method"],
            network=tags["qgssl_network"],
            seed=int(tags["qgssl_seed"]),
            run_id=run.info.run_id,
            test={k[len("test_") :]: float(v) for k, v in metrics.items() if k.startswith("test_") and math.isfinite(v)},
        )
        if with_details:
            result.per_image = _download_csv(client, result.run_id, PER_IMAGE_ARTIFACT)
            history: dict[int, float] = {}
            for m in sorted(client.get_metric_history(result.run_id, "val_dsc"), key=lambda m: (m.step, m.timestamp)):
                history[int(m.step)] = float(m.value)
            result.val_curve = sorted(history.items())
            for name in sorted(metrics):
                if name.startswith(DIAGNOSTIC_PREFIXES):
                    points = {int(m.step): float(m.value) for m in sorted(client.get_metric_history(result.run_id, name), key=lambda m: (m.step, m.timestamp))}
                    result.diagnostics[name] = sorted(points.items())
        results.append(result)
    return sorted(results, key=lambda r: (r.method, r.network, r.seed))


def load_quality_predictions(
    tracking_uri: str, experiment_name: str, step_hashes: Mapping[str, str] | None = None
) -> pd.DataFrame | None:
    """The quality evaluation run's ``true_dice``/``predicted`` table, or None."""
    import mlflow

    runs = _select_latest(_finished_runs(tracking_uri, experiment_name, "quality_eval"), step_hashes)
    if not runs:
        return None
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    return _download_csv(client, runs[0].info.run_id, QUALITY_ARTIFACT)


def load_real_predictions(
    tracking_uri: str, experiment_name: str, step_hashes: Mapping[str, str] | None = None
) -> pd.DataFrame | None:
    """All ``quality:real:<network>`` runs' scores in one table, or None when there is none."""
    import mlflow

    runs = _select_latest(_finished_runs(tracking_uri, experiment_name, "quality_real"), step_hashes)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    frames = [f for f in (_download_csv(client, r.info.run_id, REAL_PREDICTIONS_ARTIFACT) for r in runs) if f is not None]
    return pd.concat(frames, ignore_index=True) if frames else None


def real_predictions_table(scores: pd.DataFrame, methods: Sequence[str] = ()) -> pd.DataFrame:
    """Per network: one ``all`` row (every source pooled), then one row per method (its seeds pooled), in the
    order of ``methods`` (the experiment's), then any other method alphabetically, each ``*_qw`` after its base.

    The method of a source ``<method>_seed<k>`` is the part before ``_seed``. Columns: network, method and
    :data:`REAL_METRICS` (from :func:`qgssl_monai.quality.evaluation.quality_regression_metrics`).
    """
    from qgssl_monai.quality.evaluation import quality_regression_metrics

    scores = scores.assign(method=scores["source"].astype(str).str.replace(r"_seed\d+$", "", regex=True))
    rows = []
    for network, part in scores.groupby("network", sort=True):
        by_method = dict(list(part.groupby("method")))
        listed = [m for m in methods if m in by_method] + sorted(m for m in by_method if m not in methods)
        groups = [("all", part)] + [(m, by_method[m]) for m in method_order(listed)]
        for method, group in groups:
            m = quality_regression_metrics(group["predicted"].to_numpy(float), group["true_dice"].to_numpy(float))
            rows.append({"network": network, "method": method, **{k: (math.nan if m[k] is None else m[k]) for k in REAL_METRICS}})
    return pd.DataFrame(rows, columns=["network", "method", *REAL_METRICS])


# -- scope: what the run can show, and g's own check ------------------------------------------------------
#: metrics of the quality evaluation run (logged by the pipeline) shown in the scope section, with their labels
QUALITY_CHECK_METRICS = {
    "quality_heldout_n": ("held-out corrupted test masks", "{:.0f}"),
    "quality_heldout_pearson": ("Pearson r (predicted vs true Dice)", "{:.3f}"),
    "quality_heldout_mae": ("MAE", "{:.3f}"),
    "quality_image_zeroing_mae_image_zeroed": ("MAE with the image zeroed", "{:.3f}"),
    "quality_image_zeroing_mae_increase": ("MAE increase when the image is zeroed", "{:+.3f}"),
}


def load_quality_metrics(tracking_uri: str, experiment_name: str, step_hashes: Mapping[str, str] | None = None) -> dict[str, float]:
    """Metrics of the latest FINISHED quality evaluation run of the plan (empty when there is none)."""
    runs = _select_latest(_finished_runs(tracking_uri, experiment_name, "quality_eval"), step_hashes)
    return dict(runs[0].data.metrics) if runs else {}


def scope_markdown(summary: str, quality_metrics: Mapping[str, float] | None) -> str:
    """The ``report.summary`` paragraph, then g's check as a two-column table (only the metrics present)."""
    parts = [summary.strip()] if summary and summary.strip() else []
    rows = [f"| {label} | {fmt.format(quality_metrics[key])} |" for key, (label, fmt) in QUALITY_CHECK_METRICS.items()
            if quality_metrics and key in quality_metrics]  # fmt: skip
    if rows:
        parts.append("\n".join(["| quality predictor g | value |", "|---|---|", *rows]))
    return "\n\n".join(parts) + "\n" if parts else ""


def summary_table(results: Sequence[RunResult], methods: Sequence[str], networks: Sequence[str]) -> pd.DataFrame:
    """Long table: one row per (method, network, metric) with ``mean``, ``se``, ``n`` (over seeds) and ``best``.

    The per-seed value is the run's ``test_<metric>_mean``; ``best`` marks the highest mean of each
    (network, metric) column, ties (equal to the displayed 2 decimals in percent) all marked.
    """
    rows = []
    for method in method_order(methods):
        for network in networks:
            for metric in METRICS:
                values = [
                    r.test[f"{metric}_mean"]
                    for r in results
                    if r.method == method and r.network == network and f"{metric}_mean" in r.test
                ]
                mean, se = mean_se(values)
                rows.append({"method": method, "network": network, "metric": metric, "mean": mean, "se": se, "n": len(values)})
    table = pd.DataFrame(rows, columns=["method", "network", "metric", "mean", "se", "n"])
    table["best"] = False
    for (_, _), group in table.groupby(["network", "metric"]):
        shown = group["mean"].map(lambda v: round(100 * v, 2) if pd.notna(v) else -math.inf)
        if shown.max() > -math.inf:
            table.loc[group.index[shown == shown.max()], "best"] = True
    return table


def _cell(mean: float, se: float, n: int, best: bool, style: str) -> str:
    if n == 0 or not math.isfinite(mean):
        return "–" if style != "latex" else "--"
    se = se if n > 1 else math.nan  # one seed: no spread to show
    value = f"{100 * mean:.2f}"
    if style == "latex":
        value = f"\\textbf{{{value}}}" if best else value
        return value + (f" $\\pm$ {100 * se:.2f}" if math.isfinite(se) else "")
    text = value + (f" ± {100 * se:.2f}" if math.isfinite(se) else "")
    return f"**{text}**" if best and style == "markdown" else text


def render_table(table: pd.DataFrame, style: str) -> str:
    """Table 1 as ``markdown``, ``latex`` or ``csv`` (wide: rows methods, columns network x {DSC, IoU})."""
    networks = list(dict.fromkeys(table["network"]))
    methods = list(dict.fromkeys(table["method"]))
    lookup = {(r.method, r.network, r.metric): r for r in table.itertuples()}
    if style == "csv":
        wide = []
        for method in methods:
            row: dict[str, Any] = {"method": method}
            for network in networks:
                for metric in METRICS:
                    r = lookup[(method, network, metric)]
                    row[f"{network}_{metric}_mean"] = r.mean
                    row[f"{network}_{metric}_se"] = r.se
                    row[f"{network}_{metric}_n"] = r.n
                    row[f"{network}_{metric}_best"] = bool(r.best)
            wide.append(row)
        return pd.DataFrame(wide).to_csv(index=False)
    metric_names = {"dsc": "DSC", "iou": "IoU"}
    headers = ["Method"] + [f"{n} {metric_names[m]}" for n in networks for m in METRICS]
    body = []
    for method in methods:
        cells = [method]
        for network in networks:
            for metric in METRICS:
                r = lookup[(method, network, metric)]
                cells.append(_cell(r.mean, r.se, r.n, bool(r.best), style))
        body.append(cells)
    if style == "markdown":
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines) + "\n"
    if style == "latex":
        spec = "l" + "c" * (len(headers) - 1)
        esc = lambda s: s.replace("_", "\\_")  # noqa: E731
        lines = [f"\\begin{{tabular}}{{{spec}}}", "\\hline", " & ".join(esc(h) for h in headers) + " \\\\", "\\hline"]
        lines += [" & ".join([esc(row[0])] + row[1:]) + " \\\\" for row in body]
        lines += ["\\hline", "\\end{tabular}"]
        return "\n".join(lines) + "\n"
    raise ValueError(f"unknown table style {style!r}; expected markdown, latex or csv")


def _per_image_by_seed(results: Sequence[RunResult], method: str, network: str) -> dict[int, pd.Series]:
    """Per-image test DSC (index: image name) of every seed of ``method`` on ``network`` that has the CSV."""
    return {
        r.seed: r.per_image.set_index("image")["dsc"].astype(float)
        for r in results
        if r.method == method and r.network == network and r.per_image is not None
    }


def seed_averaged_pairs(
    results: Sequence[RunResult], method: str, baseline: str, network: str
) -> tuple[pd.DataFrame, list[int]]:
    """Each test image's DSC averaged over seeds, for ``method`` and ``baseline`` side by side.

    Only seeds both methods ran (with per-image CSVs) and images present in every one of those runs are
    used, so both columns average the same seeds.

    Returns:
        ``(frame, seeds)``: frame indexed by image with columns ``method`` and ``baseline`` (DSC in [0, 1]),
        naturally sorted by image name; the seeds averaged over.
    """
    ours, theirs = _per_image_by_seed(results, method, network), _per_image_by_seed(results, baseline, network)
    seeds = sorted(set(ours) & set(theirs))
    if not seeds:
        return pd.DataFrame(columns=["method", "baseline"], dtype=float), []
    images = set.intersection(*(set(ours[s].index) & set(theirs[s].index) for s in seeds))
    order = sorted(images, key=lambda name: natural_key(str(name)))
    frame = pd.DataFrame(
        {
            "method": [float(np.mean([ours[s][i] for s in seeds])) for i in order],
            "baseline": [float(np.mean([theirs[s][i] for s in seeds])) for i in order],
        },
        index=pd.Index(order, name="image"),
    )
    return frame, seeds


def paired_test(
    results: Sequence[RunResult], method: str, baseline: str, network: str, test: str = "wilcoxon"
) -> dict[str, Any]:
    """Paired comparison of per-image test DSC of ``method`` vs ``baseline`` on ``network``, n = images.

    Each image's DSC is first averaged over the seeds both methods ran (:func:`seed_averaged_pairs`); the
    test then pairs images, so seeds are not counted as independent samples (pooling seed x image pairs
    would inflate n by the number of seeds). ``test``: ``"wilcoxon"`` = two-sided Wilcoxon signed-rank test
    (``scipy.stats.wilcoxon`` defaults: zero differences dropped, exact or normal-approximation p-value as
    scipy chooses), ``"ttest"`` = paired t-test (``scipy.stats.ttest_rel``).

    Returns:
        ``{"n_images", "n_seeds", "mean_diff" (mean over images of the seed-averaged difference, DSC points),
        "statistic", "p_value", "test"}``; statistic/p-value are nan with fewer than 2 images or when every
        difference is zero.
    """
    from scipy import stats

    frame, seeds = seed_averaged_pairs(results, method, baseline, network)
    out: dict[str, Any] = {
        "n_images": len(frame), "n_seeds": len(seeds), "mean_diff": math.nan,
        "statistic": math.nan, "p_value": math.nan, "test": test,
    }  # fmt: skip
    if frame.empty:
        return out
    a, b = frame["method"].to_numpy(), frame["baseline"].to_numpy()
    diff = a - b
    out["mean_diff"] = float(100 * diff.mean())
    if len(a) < 2 or np.all(diff == 0):
        return out
    res = stats.wilcoxon(a, b) if test == "wilcoxon" else stats.ttest_rel(a, b)
    out["statistic"], out["p_value"] = float(res.statistic), float(res.pvalue)
    return out


def seed_table(results: Sequence[RunResult], methods: Sequence[str], networks: Sequence[str]) -> pd.DataFrame:
    """Per-seed mean test DSC (DSC points) of every method and network, with the seed mean, sd and spread.

    Columns: ``method``, ``network``, ``seed<k>`` per seed present anywhere, ``mean``, ``sd`` (ddof=1; nan
    for one seed), ``spread`` (max - min over seeds), ``n``. Rows without any finished run are left out.
    """
    seeds = sorted({r.seed for r in results})
    rows = []
    for method in method_order(methods):
        for network in networks:
            values = {r.seed: 100 * r.test["dsc_mean"] for r in results
                      if r.method == method and r.network == network and "dsc_mean" in r.test}  # fmt: skip
            if not values:
                continue
            v = np.array(list(values.values()))
            row: dict[str, Any] = {"method": method, "network": network}
            row.update({f"seed{s}": values.get(s, math.nan) for s in seeds})
            row.update(mean=float(v.mean()), sd=float(v.std(ddof=1)) if len(v) > 1 else math.nan,
                       spread=float(v.max() - v.min()), n=len(v))  # fmt: skip
            rows.append(row)
    return pd.DataFrame(rows, columns=["method", "network", *(f"seed{s}" for s in seeds), "mean", "sd", "spread", "n"])


def improvements(
    results: Sequence[RunResult], methods: Sequence[str], networks: Sequence[str], test: str = "wilcoxon"
) -> pd.DataFrame:
    """Every quality-guided method against its base and against the best method without quality guidance.

    Per network, only methods with results there are compared. Rows per quality-guided method
    (:func:`~qgssl_monai.experiments.config.is_quality_guided`): ``vs base`` (``mt_qw`` vs ``mt``,
    ``pl_qw`` vs ``pl_t``, ``qar_qw`` vs ``qar``) when the base ran, and ``vs best non-guided`` (the highest
    Table 1 DSC among the methods without g, SUP included) unless that is its base. All DSC columns are in
    DSC points (percent, as in Table 1): ``dsc``/``baseline_dsc``/``delta_dsc`` from the seed means of
    Table 1; ``seed_deltas`` the per-seed differences of the runs' mean test DSC (seeds both ran),
    ``seeds_better`` how many of them are > 0; ``mean_diff``, ``statistic``, ``p_value`` the paired test over
    seed-averaged per-image DSC (:func:`paired_test`, ``n_images`` images, ``n_seeds`` seeds).
    """
    table = summary_table(results, methods, networks)
    dsc = {(r.method, r.network): r.mean for r in table[table.metric == "dsc"].itertuples()}
    seed_dsc = {(r.method, r.network, r.seed): r.test["dsc_mean"] for r in results if "dsc_mean" in r.test}
    rows = []
    for network in networks:
        ran = [m for m in method_order(methods) if math.isfinite(dsc.get((m, network), math.nan))]
        baselines = [m for m in ran if not is_quality_guided(m)]
        best = max(baselines, key=lambda m: dsc[(m, network)]) if baselines else None
        pairs = []
        for method in (m for m in ran if is_quality_guided(m)):
            base = base_of_qw(method)
            if base in ran:
                pairs.append((method, base, "vs base"))
            if best is not None and best != base:
                pairs.append((method, best, "vs best non-guided"))
        for method, base, kind in pairs:
            ours, theirs = dsc[(method, network)], dsc[(base, network)]
            seeds = sorted(s for (m, n, s) in seed_dsc if m == method and n == network and (base, network, s) in seed_dsc)
            deltas = [100 * (seed_dsc[(method, network, s)] - seed_dsc[(base, network, s)]) for s in seeds]
            rows.append(
                {
                    "comparison": f"{method} vs {base}",
                    "network": network,
                    "kind": kind,
                    "dsc": 100 * ours,
                    "baseline_dsc": 100 * theirs,
                    "delta_dsc": 100 * (ours - theirs),
                    "seed_deltas": " / ".join(f"{d:+.2f}" for d in deltas),
                    "seeds_better": f"{sum(d > 0 for d in deltas)}/{len(deltas)}",
                    **paired_test(results, method, base, network, test),
                }
            )
    return pd.DataFrame(rows, columns=IMPROVEMENT_COLUMNS)


#: columns of :func:`improvements` (``improvements.csv``)
IMPROVEMENT_COLUMNS = [
    "comparison", "network", "kind", "dsc", "baseline_dsc", "delta_dsc", "seed_deltas", "seeds_better",
    "n_images", "n_seeds", "mean_diff", "statistic", "p_value", "test",
]  # fmt: skip


def first_epoch_reaching(curve: Sequence[tuple[int, float]], fraction: float = 0.96, target: float | None = None) -> int | None:
    """e_val: first epoch with validation DSC >= ``fraction`` x the curve's best (or >= ``target``)."""
    if not curve:
        return None
    threshold = target if target is not None else fraction * max(v for _, v in curve)
    return next((epoch for epoch, value in sorted(curve) if value >= threshold), None)


def convergence_table(
    results: Sequence[RunResult], methods: Sequence[str], networks: Sequence[str], fraction: float = 0.96, target: float | None = None
) -> pd.DataFrame:
    """Mean e_val over seeds (runs that never reach the target are counted in ``not_reached``)."""
    rows = []
    for method in method_order(methods):
        for network in networks:
            runs = [r for r in results if r.method == method and r.network == network and r.val_curve]
            epochs = [first_epoch_reaching(r.val_curve, fraction, target) for r in runs]
            reached = [e for e in epochs if e is not None]
            mean, se = mean_se(reached)
            rows.append(
                {"method": method, "network": network, "e_val_mean": mean, "e_val_se": se, "n": len(reached),
                 "not_reached": len(epochs) - len(reached)}
            )  # fmt: skip
    return pd.DataFrame(rows, columns=["method", "network", "e_val_mean", "e_val_se", "n", "not_reached"])


def _cells(
    results: Sequence[RunResult], methods: Sequence[str], networks: Sequence[str], keep: Any
) -> Iterator[tuple[str, str, list[RunResult]]]:
    """``(method, network, runs)`` in table order, for the cells with at least one run passing ``keep(run)``."""
    for method in method_order(methods):
        for network in networks:
            runs = [r for r in results if r.method == method and r.network == network and keep(r)]
            if runs:
                yield method, network, runs


def plateau_table(results: Sequence[RunResult], methods: Sequence[str], networks: Sequence[str]) -> pd.DataFrame:
    """Has the schedule converged? Validation DSC over the last ``1 - PLATEAU_AT`` (20%) of the epochs.

    Per run: ``best_at_80`` = best validation DSC up to epoch ``floor(0.8 E)``, ``best_at_end`` = best over
    all ``E`` epochs (the checkpoint the test uses), ``gain_last_20`` = their difference, and
    ``range_last_20`` = max - min of the raw curve over the last 20% (epoch-to-epoch noise included). All in
    DSC points, mean over seeds; ``plateaued`` = every seed's ``gain_last_20`` < ``PLATEAU_POINTS``.
    """
    rows = []
    for method, network, runs in _cells(results, methods, networks, lambda r: bool(r.val_curve)):
        gains, at80, at_end, ranges = [], [], [], []
        for run in runs:
            epochs = [e for e, _ in run.val_curve]
            cut = max(1, math.floor(PLATEAU_AT * max(epochs)))
            head = [v for e, v in run.val_curve if e <= cut] or [run.val_curve[0][1]]
            tail = [v for e, v in run.val_curve if e >= cut]
            best80, best = 100 * max(head), 100 * max(v for _, v in run.val_curve)
            at80.append(best80)
            at_end.append(best)
            gains.append(best - best80)
            ranges.append(100 * (max(tail) - min(tail)))
        rows.append({
            "method": method, "network": network, "epochs": max(e for r in runs for e, _ in r.val_curve),
            "best_at_80": float(np.mean(at80)), "best_at_end": float(np.mean(at_end)),
            "gain_last_20": float(np.mean(gains)), "range_last_20": float(np.mean(ranges)),
            "plateaued": bool(max(gains) < PLATEAU_POINTS), "n": len(runs),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=["method", "network", "epochs", "best_at_80", "best_at_end", "gain_last_20",
                                       "range_last_20", "plateaued", "n"])  # fmt: skip


def diagnostics_table(results: Sequence[RunResult], methods: Sequence[str], networks: Sequence[str]) -> pd.DataFrame:
    """Quality-weight diagnostics per quality-weighted method and network, mean over seeds.

    ``auroc_last`` / ``auroc_mean``: the weight-ranking AUROC on validation pseudo-labels (good = true Dice
    >= the handler's threshold, 0.7 in the bundle) at the last epoch / averaged over epochs;
    ``pl_dice_last``: mean true Dice of those pseudo-labels at the last epoch; ``good_fraction_last``;
    ``weight_mean_last`` / ``weight_zero_last``: mean and zero share of the training weights in the last epoch.
    """

    def last(run: RunResult, name: str) -> float:
        points = run.diagnostics.get(name)
        return points[-1][1] if points else math.nan

    def over_epochs(run: RunResult, name: str) -> float:
        points = run.diagnostics.get(name)
        return float(np.mean([v for _, v in points])) if points else math.nan

    columns = {
        "auroc_last": (last, "val_pseudo_label_auroc"),
        "auroc_mean": (over_epochs, "val_pseudo_label_auroc"),
        "pl_dice_last": (last, "val_pseudo_label_dice_mean"),
        "good_fraction_last": (last, "val_pseudo_label_good_fraction"),
        "weight_mean_last": (last, "quality_weight_mean"),
        "weight_zero_last": (last, "quality_weight_zero_fraction"),
    }
    rows = []
    for method, network, runs in _cells(results, methods, networks, lambda r: bool(r.diagnostics)):
        row: dict[str, Any] = {"method": method, "network": network, "n": len(runs)}
        for column, (reduce, name) in columns.items():
            values = [v for v in (reduce(r, name) for r in runs) if math.isfinite(v)]
            row[column] = float(np.mean(values)) if values else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["method", "network", *columns, "n"])


def _histogram_matrix(runs: Sequence[RunResult]) -> tuple[list[int], np.ndarray] | None:
    """(epochs, epochs x bins) weight-histogram fractions averaged over ``runs``, or None without histograms."""
    names = sorted({n for r in runs for n in r.diagnostics if n.startswith("quality_weight_hist_")})
    if not names:
        return None
    epochs = sorted({e for r in runs for n in names for e, _ in r.diagnostics.get(n, [])})
    matrix = np.full((len(epochs), len(names)), np.nan)
    for i, epoch in enumerate(epochs):
        for j, name in enumerate(names):
            values = [dict(r.diagnostics.get(name, [])).get(epoch) for r in runs]
            values = [v for v in values if v is not None]
            if values:
                matrix[i, j] = float(np.mean(values))
    return epochs, matrix


def _plot_diagnostics(results: Sequence[RunResult], methods: Sequence[str], networks: Sequence[str], path: Path) -> bool:
    """Weight histograms per epoch (one heat map per quality-weighted method and network) and the AUROC curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for method, network, runs in _cells(results, methods, networks, lambda r: bool(r.diagnostics)):
        histogram = _histogram_matrix(runs)
        if histogram is not None:
            panels.append((method, network, runs, histogram))
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 2.6 * len(panels)), squeeze=False)
    for (method, network, runs, (epochs, matrix)), (ax_hist, ax_auc) in zip(panels, axes):
        bins = matrix.shape[1]
        image = ax_hist.imshow(matrix.T, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1,
                               extent=(epochs[0] - 0.5, epochs[-1] + 0.5, 0, 1))  # fmt: skip
        ax_hist.set_title(f"{method} / {network}: share of QW weights per bin ({bins} bins)", fontsize=8)
        ax_hist.set_xlabel("epoch")
        ax_hist.set_ylabel("weight")
        fig.colorbar(image, ax=ax_hist, fraction=0.04)
        for name, style in (("val_pseudo_label_auroc", "-"), ("val_pseudo_label_dice_mean", "--")):
            for run in runs:
                points = run.diagnostics.get(name)
                if points:
                    ax_auc.plot(*zip(*points), style, lw=1, label=f"{name.split('_', 3)[-1]} seed {run.seed}")
        ax_auc.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax_auc.set_ylim(0, 1)
        ax_auc.set_title("validation pseudo-labels: weight-ranking AUROC (—), mean true Dice (--)", fontsize=8)
        ax_auc.set_xlabel("epoch")
        ax_auc.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    _figure_png(fig, path)
    plt.close(fig)
    return True


def _plot_sup_curves(results: Sequence[RunResult], networks: Sequence[str], path: Path) -> bool:
    """SUP's validation DSC per epoch, every seed, with the 80% mark of the plateau check."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if r.method == "sup" and r.val_curve]
    if not runs:
        return False
    fig, axes = plt.subplots(1, len(networks), figsize=(6 * len(networks), 3.5), squeeze=False)
    for ax, network in zip(axes[0], networks):
        for run in (r for r in runs if r.network == network):
            epochs, values = zip(*run.val_curve)
            ax.plot(epochs, [100 * v for v in values], lw=1, label=f"seed {run.seed}")
            ax.axvline(max(1, math.floor(PLATEAU_AT * max(epochs))), color="grey", ls=":", lw=1)
        ax.set_title(f"SUP validation DSC — {network}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("DSC (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _figure_png(fig, path)
    plt.close(fig)
    return True


def sweep_table(
    results: Sequence[RunResult],
    variants: Sequence[str],
    networks: Sequence[str],
    seeds: Sequence[int],
    method_overrides: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The validation-only hyperparameter sweep: every swept overlay's candidates ranked by validation DSC.

    Candidates of an overlay are the overlay itself (its grid settings) and its ``<overlay>@<tag>`` variants;
    each is scored by its best validation DSC (the checkpoint criterion) averaged over ``seeds`` (the sweep's
    seeds only, so every candidate sees the same seeds), in DSC points. ``selected`` marks the best candidate
    per (overlay, network); test results are not read.
    """
    from qgssl_monai.experiments.config import overlay_of

    method_overrides = method_overrides or {}
    rows = []
    for overlay in dict.fromkeys(overlay_of(v) for v in variants):
        candidates = [overlay, *(v for v in variants if overlay_of(v) == overlay and v != overlay)]
        for network in networks:
            scored = []
            for candidate in candidates:
                best = [100 * max(v for _, v in r.val_curve) for r in results
                        if r.method == candidate and r.network == network and r.seed in seeds and r.val_curve]  # fmt: skip
                if best:
                    settings = {**(method_overrides.get(overlay) or {}), **(method_overrides.get(candidate) or {} if candidate != overlay else {})}
                    scored.append({"overlay": overlay, "candidate": candidate, "network": network,
                                   "settings": ", ".join(f"{k}={v}" for k, v in sorted(settings.items())) or "defaults",
                                   "val_dsc_best": float(np.mean(best)), "n": len(best)})  # fmt: skip
            if scored:
                top = max(row["val_dsc_best"] for row in scored)
                for row in scored:
                    row["selected"] = row["val_dsc_best"] == top
                rows += scored
    return pd.DataFrame(rows, columns=["overlay", "candidate", "network", "settings", "val_dsc_best", "n", "selected"])


def _figure_png(fig: Any, path: Path) -> None:
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")


def _plot_val_curves(results: Sequence[RunResult], methods: Sequence[str], networks: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(networks), figsize=(6 * len(networks), 4), squeeze=False)
    for ax, network in zip(axes[0], networks):
        for method in method_order(methods):
            curves = [dict(r.val_curve) for r in results if r.method == method and r.network == network and r.val_curve]
            if not curves:
                continue
            epochs = sorted(set().union(*curves))
            means = [np.mean([c[e] for c in curves if e in c]) for e in epochs]
            ax.plot(epochs, means, marker="o" if len(epochs) < 15 else None, ms=3, label=method,
                    linestyle="--" if is_quality_guided(method) else "-")  # fmt: skip
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"validation DSC — {network}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("DSC (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    _figure_png(fig, path)
    plt.close(fig)


def _plot_quality_scatter(predictions: pd.DataFrame | None, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    caption = "no quality evaluation run found"
    if predictions is not None and len(predictions):
        true, pred = predictions["true_dice"].to_numpy(float), predictions["predicted"].to_numpy(float)
        ax.scatter(true, pred, s=8, alpha=0.6)
        r = float(np.corrcoef(true, pred)[0, 1]) if len(true) > 1 and true.std() > 0 and pred.std() > 0 else math.nan
        mae = float(np.abs(true - pred).mean())
        caption = f"n = {len(true)}, Pearson r = {r:.3f}, MAE = {mae:.3f}"
        ax.set_title(caption, fontsize=9)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("true Dice")
    ax.set_ylabel("predicted quality g(x, m)")
    _figure_png(fig, path)
    plt.close(fig)
    return caption


def _plot_convergence(conv: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.method}\n{r.network}" for r in conv.itertuples()]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(labels)), 4))
    values = conv["e_val_mean"].fillna(0).to_numpy()
    ax.bar(range(len(labels)), values, yerr=conv["e_val_se"].fillna(0).to_numpy(), color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("e_val (epochs)")
    ax.set_title("epochs to reach the validation target")
    _figure_png(fig, path)
    plt.close(fig)


def _fmt_frame_markdown(frame: pd.DataFrame) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "–" if not math.isfinite(v) else (f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}")
        return str(v)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _markdown_to_html_table(markdown: str) -> str:
    rows = [line.strip().strip("|").split("|") for line in markdown.strip().splitlines()]
    head, body = rows[0], rows[2:]

    def cell(text: str, tag: str) -> str:
        text = html.escape(text.strip())
        if text.startswith("**") and text.endswith("**"):
            text = f"<b>{text[2:-2]}</b>"
        return f"<{tag}>{text}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell(h, "th") for h in head) + "</tr>"]
    out += ["<tr>" + "".join(cell(c, "td") for c in row) + "</tr>" for row in body]
    return "\n".join(out + ["</table>"])


def _write_frame(frame: pd.DataFrame, out: Path, name: str) -> str:
    """``<out>/<name>.csv`` and ``<name>.md``; returns the markdown."""
    frame.to_csv(out / f"{name}.csv", index=False)
    markdown = _fmt_frame_markdown(frame)
    (out / f"{name}.md").write_text(markdown)
    return markdown


def img_tag(folder: Path, name: str, alt: str) -> str:
    """``<img>`` with ``folder / name`` embedded as base64 PNG."""
    data = base64.b64encode((folder / name).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def write_report(
    output_dir: str | Path,
    *,
    experiment_name: str,
    methods: Sequence[str],
    networks: Sequence[str],
    results: Sequence[RunResult],
    quality_predictions: pd.DataFrame | None = None,
    real_predictions: pd.DataFrame | None = None,
    paired: str = "wilcoxon",
    convergence_fraction: float = 0.96,
    target_val_dsc: float | None = None,
    title_note: str = "",
    sweep: pd.DataFrame | None = None,
    summary: str = "",
    quality_metrics: Mapping[str, float] | None = None,
) -> Path:
    """Write tables, plots and ``index.html`` into ``output_dir``; returns the HTML path.

    ``sweep``: the :func:`sweep_table`, written to ``sweep.{csv,md}`` and shown when given. ``summary`` (the
    experiment's ``report.summary``) and ``quality_metrics`` (see :func:`load_quality_metrics`) make the scope
    section at the top (:func:`scope_markdown`).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scope_md = scope_markdown(summary, quality_metrics)
    (out / "scope.md").write_text(scope_md)
    scope_html = "".join(
        _markdown_to_html_table(block) if block.startswith("|") else f"<p>{html.escape(block)}</p>" for block in scope_md.split("\n\n") if block.strip()
    )
    table = summary_table(results, methods, networks)
    md = render_table(table, "markdown")
    (out / "table1.md").write_text(md)
    (out / "table1.csv").write_text(render_table(table, "csv"))
    (out / "table1.tex").write_text(render_table(table, "latex"))
    gains_md = _write_frame(improvements(results, methods, networks, paired), out, "improvements")
    seeds_md = _write_frame(seed_table(results, methods, networks), out, "seeds")
    plateau_md = _write_frame(plateau_table(results, methods, networks), out, "plateau")
    diagnostics = diagnostics_table(results, methods, networks)
    diagnostics_md = _write_frame(diagnostics, out, "diagnostics")
    has_diagnostics_png = _plot_diagnostics(results, methods, networks, out / "diagnostics.png")
    has_sup_png = _plot_sup_curves(results, networks, out / "sup_val_curve.png")
    sweep_html = ""
    if sweep is not None:
        sweep_html = ("<h2>Hyperparameter sweep (validation split only): best validation DSC, DSC points</h2>\n"
                      + _markdown_to_html_table(_write_frame(sweep, out, "sweep")))  # fmt: skip
    conv = convergence_table(results, methods, networks, convergence_fraction, target_val_dsc)
    conv_md = _write_frame(conv, out, "convergence")
    _plot_val_curves(results, methods, networks, out / "val_curves.png")
    scatter_caption = _plot_quality_scatter(quality_predictions, out / "quality_scatter.png")
    _plot_convergence(conv, out / "convergence.png")
    real_section = "<p>no quality:real run found (g is evaluated on SSL predictions when the experiment trains g)</p>"
    if real_predictions is not None and len(real_predictions):
        from qgssl_monai.quality.evaluation import AUROC_KEY, GOOD_DICE
        from qgssl_monai.quality.plots import plot_quality_scatter

        real = real_predictions_table(real_predictions, methods)
        real.to_csv(out / "real_predictions.csv", index=False)
        real_md = _fmt_frame_markdown(real)
        (out / "real_predictions.md").write_text(real_md)
        pooled = real[real["method"] == "all"].iloc[0]
        plot_quality_scatter(
            real_predictions["true_dice"].to_numpy(float), real_predictions["predicted"].to_numpy(float),
            out / "real_predictions_scatter.png", pearson=pooled["pearson"], mae=pooled["mae"], bias=pooled["bias"],
            auroc=None if math.isnan(pooled[AUROC_KEY]) else pooled[AUROC_KEY], good_dice=GOOD_DICE,
            groups=real_predictions["network"].astype(str).tolist(), title=f"g on SSL test predictions ({pooled['network']})",
        )  # fmt: skip
        real_section = _markdown_to_html_table(real_md) + "\n" + img_tag(out, "real_predictions_scatter.png", "g on real predictions")

    def img(name: str, alt: str) -> str:
        return img_tag(out, name, alt)

    test_name = "Wilcoxon signed-rank" if paired == "wilcoxon" else "paired t-test"
    target = f"{target_val_dsc:.3f} absolute" if target_val_dsc is not None else f"{convergence_fraction:.0%} of the run's best"
    seeds = sorted({r.seed for r in results})
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(experiment_name)} — report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #bbb;padding:3px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>{html.escape(experiment_name)}</h1>
<p>{len(results)} finished SSL runs read from MLflow; seeds {seeds}. {html.escape(title_note)}</p>
{scope_html}
<h2>Table 1: test DSC / IoU (%), mean ± s.e. over seeds, best in bold</h2>
{_markdown_to_html_table(md)}
<h2>Improvements (DSC points): every quality-guided method vs its base and vs the best non-guided method</h2>
<p>delta_dsc: difference of the Table 1 means; seed_deltas / seeds_better: per-seed differences of the runs'
mean test DSC; mean_diff, statistic, p_value: paired {test_name} test over test images (n = n_images), each
image's DSC first averaged over the n_seeds seeds both methods ran.</p>
{_markdown_to_html_table(gains_md)}
{sweep_html}
<h2>Per-seed mean test DSC (DSC points) and seed spread</h2>
{_markdown_to_html_table(seeds_md)}
<h2>Schedule check: validation DSC over the last {100 * (1 - PLATEAU_AT):.0f}% of the epochs (DSC points)</h2>
<p>Converged when the best validation DSC gains less than {PLATEAU_POINTS:g} point after {100 * PLATEAU_AT:.0f}% of the epochs (plateaued).</p>
{_markdown_to_html_table(plateau_md)}
{img("sup_val_curve.png", "SUP validation curve") if has_sup_png else "<p>no SUP run</p>"}
<h2>Quality-weight diagnostics</h2>
<p>Training weights per epoch (histogram) and, on the labeled validation images passed through each method's
unsupervised branch, the AUROC of g's weight for "pseudo-label true Dice &ge; 0.7" and the pseudo-labels' mean true Dice.</p>
{_markdown_to_html_table(diagnostics_md) if len(diagnostics) else "<p>no quality-weighted runs with diagnostics</p>"}
{img("diagnostics.png", "quality-weight diagnostics") if has_diagnostics_png else ""}
<h2>Convergence: e_val = first epoch reaching {html.escape(target)} validation DSC</h2>
{_markdown_to_html_table(conv_md)}
{img("convergence.png", "e_val per method")}
<h2>Validation DSC curves</h2>
{img("val_curves.png", "validation DSC curves")}
<h2>Predicted quality vs true Dice (test set)</h2>
<p>{html.escape(scatter_caption)}</p>
{img("quality_scatter.png", "quality scatter")}
<h2>g on the SSL networks' test predictions (networks outside g's training)</h2>
<p>bias = mean(predicted - true); AUROC: g's score separating true Dice &ge; 0.7 from the rest.</p>
{real_section}
</body></html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
