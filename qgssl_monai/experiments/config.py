"""Experiment definitions: the YAML read by ``qgssl experiment run/report``.

An experiment names its data (labeled + unlabeled manifests), the SSL methods, networks and seeds
of the grid, the training budget and any bundle overrides. ``load_experiment`` validates every
field and reports all problems at once, naming the file and the setting; unknown method/network
names are listed against the overlays that exist in ``bundles/ssl_segmentation/configs/{method,net}``.

Minimal example (see ``experiments/demo.yaml`` for every key)::

    name: qgssl-demo
    data: {labeled: demo_data/manifest.json, unlabeled: demo_data/manifest.json}
    methods: [sup, qar]
    networks: [unet]
    seeds: [0, 1]
    epochs: 4
    image_size: 64
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ExperimentConfig",
    "ExperimentConfigError",
    "DataSpec",
    "QualitySpec",
    "ExecutionSpec",
    "ReportSpec",
    "QUALITY_GUIDED",
    "SweepSpec",
    "overlay_of",
    "base_of_qw",
    "default_bundles_dir",
    "available_overlays",
    "load_experiment",
    "stable_hash",
    "is_quality_guided",
]

#: methods that need the trained quality predictor g (QAR and every quality-weighted variant)
QUALITY_GUIDED = ("qar",)


def overlay_of(method: str) -> str:
    """The method overlay a grid name runs: ``"pl_qw@lam1"`` (a sweep variant of ``pl_qw``, see
    :class:`SweepSpec`) -> ``"pl_qw"``; a plain name is its own overlay."""
    return method.split("@", 1)[0]


def is_quality_guided(method: str) -> bool:
    """True when ``method`` uses g: QAR and every ``*_qw`` variant (sweep variants as their overlay)."""
    method = overlay_of(method)
    return method in QUALITY_GUIDED or method.endswith("_qw")


#: ``*_qw`` overlays whose baseline is not simply the name without ``_qw``: PL-QW weights the plain
#: pseudo-labels that PL-T thresholds
QW_BASE = {"pl_qw": "pl_t"}


def base_of_qw(method: str) -> str | None:
    """The baseline a ``*_qw`` method is compared against (``mt_qw`` -> ``mt``, ``pl_qw`` -> ``pl_t``), or None."""
    method = overlay_of(method)
    if method in QW_BASE:
        return QW_BASE[method]
    return method[: -len("_qw")] if method.endswith("_qw") else None


class ExperimentConfigError(ValueError):
    """An experiment YAML is invalid; the message names the file and every bad setting."""


def default_bundles_dir() -> Path:
    """``<repo>/bundles`` beside the (editable-installed) package."""
    return Path(__file__).resolve().parents[2] / "bundles"


def available_overlays(bundles_dir: Path, kind: str) -> list[str]:
    """Names of ``bundles/ssl_segmentation/configs/<kind>/*.json`` (``kind`` = ``method`` or ``net``)."""
    folder = Path(bundles_dir) / "ssl_segmentation" / "configs" / kind
    return sorted(p.stem for p in folder.glob("*.json"))


def stable_hash(obj: Any, length: int = 12) -> str:
    """Order-independent SHA-256 of a JSON-able object (dict keys sorted), first ``length`` hex digits."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass
class DataSpec:
    """Where the images come from.

    ``labeled``: manifest whose ``training``/``validation``/``test`` lists are used;
    ``unlabeled``: manifest whose ``unlabeled`` list is the unlabeled pool (a different manifest without
    one contributes the images of all its splits, labels dropped); ``num_labeled``: keep only this many
    labeled training cases (seeded by ``split_seed``; the rest join the unlabeled pool), ``None`` = all.
    """

    labeled: str
    unlabeled: str | None = None
    labeled_root: str | None = None
    unlabeled_root: str | None = None
    name: str | None = None
    num_labeled: int | None = None
    split_seed: int = 0


@dataclass
class QualitySpec:
    """Quality predictor g: Type 2 source, weak-snapshot epochs, training epochs and bundle overrides."""

    #: epochs after which weak U-Net snapshots are saved (an integer n means 1..n); used by type2 in_sample
    weak_epochs: int | list[int] = field(default_factory=lambda: [1, 3, 5, 10, 15, 20])
    epochs: int = 150
    overrides: dict[str, Any] = field(default_factory=dict)
    #: Type 2 masks of g: ``in_sample`` (the paper's weak snapshots on their own training images, step
    #: ``quality:weak``) or ``out_of_fold`` (cross-fitted networks on images they never saw, step ``quality:oof``)
    type2: str = "in_sample"
    #: ``train_oof.json`` overrides for ``out_of_fold`` (``num_folds``, ``oof_epochs``, ``oof_architectures``...)
    oof: dict[str, Any] = field(default_factory=dict)
    #: use an existing ``model.pt`` instead of training g (skips the weak + train steps)
    checkpoint: str | None = None


@dataclass
class ExecutionSpec:
    """How runs are launched.

    ``launcher``: ``inprocess`` (``monai.bundle.run`` in this process; the fastest on CPU),
    ``subprocess`` (``python -m monai.bundle run`` per step; isolates failures and memory) or ``auto``
    (``subprocess`` when several GPUs are visible, else ``inprocess``). ``devices``: ``auto`` (every
    visible GPU, else CPU), ``cpu`` or a list of GPU indices; with several GPUs the SSL runs fan out, one
    run per GPU. ``ddp_nproc``: > 1 launches each SSL training with ``torchrun`` on the bundle's
    ``multi_gpu_train.json`` (one large run over ``ddp_nproc`` GPUs instead of fan-out).
    ``cpu_workers``: on CPU (no GPU selected), how many SSL runs go side by side, each a subprocess with
    ``OMP_NUM_THREADS = max(1, cores // cpu_workers)``; small networks train faster as several one-thread
    runs than as one run over every core. Default 1 (sequential, in this process).
    """

    launcher: str = "auto"
    devices: str | list[int] = "auto"
    ddp_nproc: int = 1
    cpu_workers: int = 1


@dataclass
class ReportSpec:
    """Report settings.

    ``convergence_fraction``: e_val is the first epoch whose validation DSC reaches this fraction of
    the run's best validation DSC (``target_val_dsc`` instead, when given, is an absolute target).
    ``paired_test``: ``wilcoxon`` (signed-rank) or ``ttest`` (paired t-test) over per-image test DSC,
    images paired by (seed, image) across the two methods.
    ``summary``: one paragraph printed at the top of the report, saying what the run can and cannot show
    (data, budget, where stronger evidence lives); empty = none.
    """

    convergence_fraction: float = 0.96
    target_val_dsc: float | None = None
    paired_test: str = "wilcoxon"
    summary: str = ""


@dataclass
class SweepSpec:
    """A small hyperparameter sweep, judged on the validation split only.

    ``methods``: variants ``<overlay>@<tag>`` (e.g. ``pl_qw@lam1``) whose settings are
    ``overrides.method["<overlay>@<tag>"]`` on top of the overlay's own ``overrides.method["<overlay>"]``.
    They run as extra SSL steps (``ssl:<variant>:<network>:<seed>``) on ``networks`` (default: the first
    network) and ``seeds`` (default: the first seed), beside the grid; the report's sweep table ranks each
    overlay's variants (and the overlay itself) by best validation DSC over those seeds. Test DSC of the
    variants never enters Table 1 or the comparisons.
    """

    methods: list[str] = field(default_factory=list)
    networks: list[str] | None = None
    seeds: list[int] | None = None


@dataclass
class ExperimentConfig:
    """A validated experiment. Paths are absolute (resolved against the YAML's folder)."""

    name: str
    data: DataSpec
    methods: list[str]
    networks: list[str]
    seeds: list[int]
    epochs: int
    image_size: int
    quality: QualitySpec = field(default_factory=QualitySpec)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    sweep: SweepSpec = field(default_factory=SweepSpec)
    network_size: str = "small"
    #: bundle overrides: ``global`` (every bundle), ``ssl`` (every SSL run), ``method: {name: {...}}``,
    #: ``network: {name: {...}}``, ``evaluate`` (the test evaluation)
    overrides: dict[str, Any] = field(default_factory=dict)
    output: str | None = None
    bundles_dir: str = field(default_factory=lambda: str(default_bundles_dir()))
    #: ``qgssl demo-job`` only: arguments of ``generate_demo_dataset`` (n_labeled, n_unlabeled, image_size, seed)
    demo_data: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def config_hash(self) -> str:
        """Hash of everything that changes results (not the output folder or launch settings)."""
        content = self.to_dict()
        for key in ("output", "source", "execution", "report", "bundles_dir", "demo_data"):
            content.pop(key, None)
        return stable_hash(content)

    def ssl_overrides(self, method: str, network: str) -> dict[str, Any]:
        """Merged overrides for one SSL run: global < ssl < network < method."""
        merged: dict[str, Any] = {}
        merged.update(self.overrides.get("global", {}) or {})
        merged.update(self.overrides.get("ssl", {}) or {})
        merged.update((self.overrides.get("network", {}) or {}).get(network, {}) or {})
        per_method = self.overrides.get("method", {}) or {}
        merged.update(per_method.get(overlay_of(method), {}) or {})
        if overlay_of(method) != method:
            merged.update(per_method.get(method, {}) or {})
        return merged

    @property
    def sweep_networks(self) -> list[str]:
        return list(self.sweep.networks or self.networks[:1])

    @property
    def sweep_seeds(self) -> list[int]:
        return list(self.sweep.seeds if self.sweep.seeds is not None else self.seeds[:1])


_TOP_KEYS = {
    "name", "data", "methods", "networks", "seeds", "epochs", "image_size", "quality", "execution",
    "report", "network_size", "overrides", "output", "bundles_dir", "demo_data", "sweep",
}  # fmt: skip
_OVERRIDE_KEYS = {"global", "ssl", "method", "network", "evaluate", "quality"}


def _resolve(path: str | None, base: Path) -> str | None:
    if path is None:
        return None
    p = Path(str(path)).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _dataclass_from(cls: type, raw: Any, where: str, errors: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        errors.append(f"{where}: expected a mapping, got {type(raw).__name__}")
        return cls.__new__(cls)
    fields = set(cls.__dataclass_fields__)
    unknown = sorted(set(raw) - fields)
    if unknown:
        errors.append(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    try:
        return cls(**{k: v for k, v in raw.items() if k in fields})
    except TypeError as err:
        errors.append(f"{where}: {err}")
        return None


def _names(raw: Any, where: str, errors: list[str]) -> list[str]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, Sequence) or not raw or not all(isinstance(x, str) for x in raw):
        errors.append(f"{where}: expected a non-empty list of names, got {raw!r}")
        return []
    if len(set(raw)) != len(raw):
        errors.append(f"{where}: duplicate names in {list(raw)}")
    return list(raw)


def load_experiment(
    path: str | Path | None = None,
    *,
    content: Mapping[str, Any] | None = None,
    base_dir: str | Path | None = None,
    updates: Mapping[str, Any] | None = None,
) -> ExperimentConfig:
    """Read and validate an experiment YAML (or an already-parsed ``content`` mapping).

    Args:
        path: the YAML file; relative paths inside it resolve against its folder.
        content: parsed content instead of ``path``.
        base_dir: folder for relative paths when ``content`` is given (default: cwd).
        updates: top-level keys replaced after reading (e.g. ``{"data": {...}}`` from ``qgssl demo-job``).

    Raises:
        ExperimentConfigError: listing every problem, prefixed with the file name.
    """
    where = str(path) if path is not None else "<experiment>"
    if content is None:
        if path is None:
            raise ExperimentConfigError("load_experiment needs a path or content")
        p = Path(path)
        if not p.is_file():
            raise ExperimentConfigError(f"{where}: experiment file not found")
        try:
            content = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ExperimentConfigError(f"{where}: not valid YAML: {err}") from err
        base = p.resolve().parent
    else:
        base = Path(base_dir or Path.cwd()).resolve()
    if not isinstance(content, Mapping):
        raise ExperimentConfigError(f"{where}: top level must be a mapping")
    raw = dict(content)
    raw.update(updates or {})
    errors: list[str] = []
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        errors.append(f"unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    for key in ("name", "data", "methods", "networks", "seeds", "epochs", "image_size"):
        if key not in raw:
            errors.append(f"missing required key '{key}'")
    if errors:
        raise ExperimentConfigError(f"{where}: " + "; ".join(errors))

    name = raw["name"]
    if not isinstance(name, str) or not name.strip() or "/" in name:
        errors.append(f"name: expected a non-empty string without '/', got {name!r}")
    data = _dataclass_from(DataSpec, raw["data"], "data", errors)
    quality = _dataclass_from(QualitySpec, raw.get("quality"), "quality", errors)
    execution = _dataclass_from(ExecutionSpec, raw.get("execution"), "execution", errors)
    report = _dataclass_from(ReportSpec, raw.get("report"), "report", errors)
    sweep = _dataclass_from(SweepSpec, raw.get("sweep"), "sweep", errors)
    methods = _names(raw["methods"], "methods", errors)
    sweep_methods = _names(sweep.methods, "sweep.methods", errors) if isinstance(sweep, SweepSpec) and sweep.methods else []
    networks = _names(raw["networks"], "networks", errors)
    seeds = raw["seeds"]
    if isinstance(seeds, int):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        errors.append(f"seeds: expected a non-empty list of integers >= 0, got {raw['seeds']!r}")
        seeds = []
    elif len(set(seeds)) != len(seeds):
        errors.append(f"seeds: duplicates in {seeds}")
    for key in ("epochs", "image_size"):
        if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 1:
            errors.append(f"{key}: expected a positive integer, got {raw[key]!r}")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        errors.append("overrides: expected a mapping")
        overrides = {}
    else:
        bad = sorted(set(overrides) - _OVERRIDE_KEYS)
        if bad:
            errors.append(f"overrides: unknown section(s) {bad}; allowed: {sorted(_OVERRIDE_KEYS)}")
        for section in ("method", "network"):
            named = [*methods, *sweep_methods, *map(overlay_of, sweep_methods)] if section == "method" else networks
            extra = sorted(set(overrides.get(section) or {}) - set(named))
            if extra:
                errors.append(f"overrides.{section}: {extra} not in the experiment's {section}s")

    bundles_dir = _resolve(raw.get("bundles_dir"), base) or str(default_bundles_dir())
    if not Path(bundles_dir, "ssl_segmentation").is_dir():
        errors.append(f"bundles_dir: no ssl_segmentation bundle under {bundles_dir}")
    else:
        for kind, names, label in (("method", methods + sweep_methods, "methods"), ("net", networks, "networks")):
            known = available_overlays(Path(bundles_dir), kind)
            missing = [n for n in names if overlay_of(n) not in known]
            if missing:
                errors.append(f"{label}: unknown {missing}; available: {known}")

    if execution is not None:
        if execution.launcher not in ("auto", "inprocess", "subprocess"):
            errors.append(f"execution.launcher: {execution.launcher!r} not in ['auto', 'inprocess', 'subprocess']")
        devs = execution.devices
        if not (devs in ("auto", "cpu") or (isinstance(devs, list) and all(isinstance(d, int) for d in devs))):
            errors.append(f"execution.devices: expected 'auto', 'cpu' or a list of GPU indices, got {devs!r}")
        if not isinstance(execution.cpu_workers, int) or execution.cpu_workers < 1:
            errors.append(f"execution.cpu_workers: expected an integer >= 1, got {execution.cpu_workers!r}")
        if not isinstance(execution.ddp_nproc, int) or execution.ddp_nproc < 1:
            errors.append(f"execution.ddp_nproc: expected an integer >= 1, got {execution.ddp_nproc!r}")
        elif execution.ddp_nproc > 1 and not Path(bundles_dir, "ssl_segmentation", "configs", "multi_gpu_train.json").is_file():
            errors.append("execution.ddp_nproc > 1 needs bundles/ssl_segmentation/configs/multi_gpu_train.json, which does not exist")
    if report is not None:
        if report.paired_test not in ("wilcoxon", "ttest"):
            errors.append(f"report.paired_test: {report.paired_test!r} not in ['wilcoxon', 'ttest']")
        if not 0 < float(report.convergence_fraction) <= 1:
            errors.append("report.convergence_fraction: expected a value in (0, 1]")
        if not isinstance(report.summary, str):
            errors.append(f"report.summary: expected a string (one paragraph), got {type(report.summary).__name__}")
    if data is not None and isinstance(data, DataSpec):
        if not data.labeled:
            errors.append("data.labeled: a manifest path is required")
        data.labeled = _resolve(data.labeled, base)
        data.unlabeled = _resolve(data.unlabeled, base) or data.labeled
        data.labeled_root = _resolve(data.labeled_root, base)
        data.unlabeled_root = _resolve(data.unlabeled_root, base)
        if data.num_labeled is not None and (not isinstance(data.num_labeled, int) or data.num_labeled < 1):
            errors.append(f"data.num_labeled: expected a positive integer or null, got {data.num_labeled!r}")
    if quality is not None and isinstance(quality, QualitySpec):
        quality.checkpoint = _resolve(quality.checkpoint, base)
        if not isinstance(quality.epochs, int) or quality.epochs < 1:
            errors.append("quality.epochs: expected a positive integer")
        if quality.type2 not in ("in_sample", "out_of_fold"):
            errors.append(f"quality.type2: {quality.type2!r} not in ['in_sample', 'out_of_fold']")
        if not isinstance(quality.oof, dict):
            errors.append(f"quality.oof: expected a mapping of train_oof.json overrides, got {quality.oof!r}")
        weak = quality.weak_epochs
        if isinstance(weak, int) and not isinstance(weak, bool):
            quality.weak_epochs = list(range(1, weak + 1)) if weak >= 1 else []
        if not isinstance(quality.weak_epochs, list) or not quality.weak_epochs or not all(
            isinstance(e, int) and e >= 1 for e in quality.weak_epochs
        ):
            errors.append(f"quality.weak_epochs: expected a positive integer or a list of epochs >= 1, got {weak!r}")
    if isinstance(sweep, SweepSpec):
        sweep.methods = sweep_methods
        if sweep.networks is not None and not set(_names(sweep.networks, "sweep.networks", errors)) <= set(networks):
            errors.append(f"sweep.networks: {sweep.networks} must be among the experiment's networks {networks}")
        if sweep.seeds is not None and (not isinstance(sweep.seeds, list) or not all(isinstance(x, int) and x >= 0 for x in sweep.seeds)):
            errors.append(f"sweep.seeds: expected a list of integers >= 0, got {sweep.seeds!r}")
    if errors:
        raise ExperimentConfigError(f"{where}: " + "; ".join(errors))
    return ExperimentConfig(
        name=name,
        data=data,
        methods=methods,
        networks=networks,
        seeds=list(seeds),
        epochs=int(raw["epochs"]),
        image_size=int(raw["image_size"]),
        quality=quality,
        execution=execution,
        report=report,
        sweep=sweep,
        network_size=str(raw.get("network_size", "small")),
        overrides={k: dict(v or {}) for k, v in overrides.items()},
        output=_resolve(raw.get("output"), base),
        bundles_dir=bundles_dir,
        demo_data=dict(raw.get("demo_data") or {}),
        source=str(Path(path).resolve()) if path is not None else None,
    )
