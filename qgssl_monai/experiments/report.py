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
* ``scope.md`` — the experiment's ``report.summary`` paragraph (what the run can and cannot show) and g's
  own check from the quality evaluation run: Pearson r and MAE on held-out corrupted test masks, and how much
  the MAE rises when the image channels are zeroed (a g that reads the image gets clearly worse);
* ``index.html`` — everything above in one self-contained page (images embedded as base64 PNG).
"""

from __future__ import annotations

import base64
import html
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qgssl_monai.experiments.config import base_of_qw, is_quality_guided
from qgssl_monai.experiments.tracking import TAG_EXPERIMENT, TAG_KIND, TAG_STEP, TAG_STEP_HASH
from qgssl_monai.metrics import mean_se as metrics_mean_se

__all__ = [
    "PER_IMAGE_ARTIFACT",
    "QUALITY_ARTIFACT",
    "RunResult",
    "mean_se",
    "method_order",
    "load_results",
    "load_quality_predictions",
    "load_quality_metrics",
    "scope_markdown",
    "summary_table",
    "render_table",
    "paired_test",
    "improvements",
    "first_epoch_reaching",
    "convergence_table",
    "write_report",
]

logger = logging.getLogger(__name__)

#: per-image test metrics CSV logged on every SSL run (columns image, dsc, iou, hd95, asd)
PER_IMAGE_ARTIFACT = "metrics/test_per_image.csv"
#: predicted quality vs true Dice on the test set, logged on the quality evaluation run (columns true_dice, predicted)
QUALITY_ARTIFACT = "quality/test_predictions.csv"
METRICS = ("dsc", "iou")


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


def _download_csv(client: Any, run_id: str, artifact: str) -> pd.DataFrame | None:
    try:
        with tempfile.TemporaryDirectory() as tmp:
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
    tracking_uri: str, experiment_name: str, step_hashes: Mapping[str, str] | None = None, with_details: bool = True
) -> list[RunResult]:
    """FINISHED SSL runs of the experiment (latest per step; only current step hashes when given).

    Each run must carry tags ``qgssl_method``, ``qgssl_network``, ``qgssl_seed`` (tags, not params: the
    bundle logs its own ``method`` param, e.g. ``mt-qw`` for the ``mt_qw`` overlay) and metrics ``test_dsc_mean``,
    ``test_iou_mean`` (``test_*`` metrics are all read); details are the per-image CSV artifact and the
    ``val_dsc`` history.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    results = []
    for run in _select_latest(_finished_runs(tracking_uri, experiment_name, "ssl"), step_hashes):
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


def paired_test(
    results: Sequence[RunResult], method: str, baseline: str, network: str, test: str = "wilcoxon"
) -> dict[str, Any]:
    """Paired comparison of per-image test DSC of ``method`` vs ``baseline`` on ``network``.

    Pairs are (seed, image) present in both methods' per-image CSVs, pooled over seeds.

    Returns:
        ``{"n_pairs", "mean_diff" (per-image, method - baseline), "statistic", "p_value", "test"}``;
        statistic/p-value are nan with fewer than 2 pairs or when every difference is zero.
    """
    from scipy import stats

    def frames(name: str) -> dict[int, pd.DataFrame]:
        return {
            r.seed: r.per_image.set_index("image")["dsc"]
            for r in results
            if r.method == name and r.network == network and r.per_image is not None
        }

    ours, theirs = frames(method), frames(baseline)
    a: list[float] = []
    b: list[float] = []
    for seed in sorted(set(ours) & set(theirs)):
        common = sorted(set(ours[seed].index) & set(theirs[seed].index))
        a.extend(float(ours[seed][i]) for i in common)
        b.extend(float(theirs[seed][i]) for i in common)
    out: dict[str, Any] = {"n_pairs": len(a), "mean_diff": math.nan, "statistic": math.nan, "p_value": math.nan, "test": test}
    if not a:
        return out
    diff = np.asarray(a) - np.asarray(b)
    out["mean_diff"] = float(diff.mean())
    if len(a) < 2 or np.all(diff == 0):
        return out
    res = stats.wilcoxon(a, b) if test == "wilcoxon" else stats.ttest_rel(a, b)
    out["statistic"], out["p_value"] = float(res.statistic), float(res.pvalue)
    return out


def improvements(
    results: Sequence[RunResult], methods: Sequence[str], networks: Sequence[str], test: str = "wilcoxon"
) -> pd.DataFrame:
    """Every ``*_qw`` vs its base and QAR vs the best non-quality-guided method, per network.

    Only methods with results on a network are compared there; a ``*_qw`` whose base was not run on that
    network (e.g. a reduced method set on a second network) is compared with the best method without
    quality guidance instead, like QAR. ``delta_dsc`` = difference of the seed-mean test DSC (the Table 1
    numbers); the paired test is over per-image DSC (:func:`paired_test`).
    """
    table = summary_table(results, methods, networks)
    dsc = {(r.method, r.network): r.mean for r in table[table.metric == "dsc"].itertuples()}
    rows = []
    for network in networks:
        ran = [m for m in method_order(methods) if math.isfinite(dsc.get((m, network), math.nan))]
        baselines = [m for m in ran if not is_quality_guided(m)]
        best = max(baselines, key=lambda m: dsc[(m, network)]) if baselines else None
        pairs = []
        for method in ran:
            base = base_of_qw(method)
            if base in ran:
                pairs.append((method, base))
            elif (method == "qar" or base is not None) and best is not None:
                pairs.append((method, best))
        for method, base in pairs:
            ours, theirs = dsc.get((method, network), math.nan), dsc.get((base, network), math.nan)
            stats_row = paired_test(results, method, base, network, test)
            rows.append(
                {
                    "comparison": f"{method} vs {base}",
                    "network": network,
                    "dsc": ours,
                    "baseline_dsc": theirs,
                    "delta_dsc": ours - theirs,
                    **stats_row,
                }
            )
    return pd.DataFrame(
        rows,
        columns=["comparison", "network", "dsc", "baseline_dsc", "delta_dsc", "n_pairs", "mean_diff", "statistic", "p_value", "test"],
    )


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


def write_report(
    output_dir: str | Path,
    *,
    experiment_name: str,
    methods: Sequence[str],
    networks: Sequence[str],
    results: Sequence[RunResult],
    quality_predictions: pd.DataFrame | None = None,
    paired: str = "wilcoxon",
    convergence_fraction: float = 0.96,
    target_val_dsc: float | None = None,
    title_note: str = "",
    summary: str = "",
    quality_metrics: Mapping[str, float] | None = None,
) -> Path:
    """Write tables, plots and ``index.html`` into ``output_dir``; returns the HTML path.

    ``summary`` (the experiment's ``report.summary``) and ``quality_metrics`` (see :func:`load_quality_metrics`)
    make the scope section at the top (:func:`scope_markdown`).
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
    gains = improvements(results, methods, networks, paired)
    gains.to_csv(out / "improvements.csv", index=False)
    gains_md = _fmt_frame_markdown(gains)
    (out / "improvements.md").write_text(gains_md)
    conv = convergence_table(results, methods, networks, convergence_fraction, target_val_dsc)
    conv.to_csv(out / "convergence.csv", index=False)
    conv_md = _fmt_frame_markdown(conv)
    (out / "convergence.md").write_text(conv_md)
    _plot_val_curves(results, methods, networks, out / "val_curves.png")
    scatter_caption = _plot_quality_scatter(quality_predictions, out / "quality_scatter.png")
    _plot_convergence(conv, out / "convergence.png")

    def img(name: str, alt: str) -> str:
        data = base64.b64encode((out / name).read_bytes()).decode()
        return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'

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
<h2>Improvements (paired {test_name} over per-image test DSC, pooled over seeds)</h2>
{_markdown_to_html_table(gains_md)}
<h2>Convergence: e_val = first epoch reaching {html.escape(target)} validation DSC</h2>
{_markdown_to_html_table(conv_md)}
{img("convergence.png", "e_val per method")}
<h2>Validation DSC curves</h2>
{img("val_curves.png", "validation DSC curves")}
<h2>Predicted quality vs true Dice (test set)</h2>
<p>{html.escape(scatter_caption)}</p>
{img("quality_scatter.png", "quality scatter")}
</body></html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
