"""The experiment pipeline as runner steps executing the repository's MONAI bundles.

Steps, in order (keys as used by ``--only``)::

    data:prepare         combined manifest <out>/data/manifest.json, validated (assert_valid_manifest)
    quality:weak         quality_predictor/train_weak.json   -> <out>/quality/models/weak/weak_epoch_*.pt
                         (quality.type2 in_sample, the default)
    quality:oof          quality_predictor/train_oof.json    -> <out>/quality/models/oof/oof_pool_<size>px.json
                         (quality.type2 out_of_fold: cross-fitted fold networks and their predictions)
    quality:train        quality_predictor/train.json        -> <out>/quality/models/model.pt
    quality:evaluate     quality_predictor/evaluate.json     -> <out>/quality/eval/quality_metrics.json
    ssl:<m>:<net>:<seed> ssl_segmentation/train.json + method/<m>.json + net/<net>.json
                         (training, then the test evaluation the bundle runs on completion)
                         -> <out>/ssl/<m>/<net>/seed<seed>/{models/model.pt, eval/test_metrics_per_image.csv}
    quality:real:<net>   quality_predictor/evaluate.json with every ssl:*:<net>:* model as a segmentation
                         source: g on the test predictions of networks that took no part in its training
                         -> <out>/quality/eval/real_predictions/<net>/quality_metrics.json

Every bundle call is written to an args file (``<step dir>/bundle_args/<stage>.json``: config files,
metadata, tracking settings, overrides) and executed with ``monai.bundle.run(args_file=...)`` in this
process (``inprocess``), as ``python -m qgssl_monai.experiments.bundle_main --args_file ...`` (``subprocess``;
that is ``monai.bundle run`` with MONAI's known notices filtered, see ``bundle_main``), or under ``torchrun``
with the bundle's ``multi_gpu_train.json`` (``ddp_nproc`` > 1). The bundles' MLflow handlers are pointed
at the step's MLflow run (tracking URI, experiment name and the step's unique run name as overrides;
``close_on_complete`` off, so the runner decides FINISHED); afterwards the step logs what the report needs:
``val_dsc`` curve, ``test_{dsc,iou,hd95,asd}_{mean,se}``, the per-image CSV, the best checkpoint, the args
file and the experiment params.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qgssl_monai.experiments.bundle_main import known_notices_filtered
from qgssl_monai.experiments.config import ExperimentConfig, is_quality_guided, overlay_of
from qgssl_monai.experiments.report import PER_IMAGE_ARTIFACT, QUALITY_ARTIFACT, REAL_PREDICTIONS_ARTIFACT
from qgssl_monai.experiments.runner import Step, StepContext

__all__ = [
    "BundleCall",
    "Launch",
    "prepare_manifest",
    "git_commit",
    "resolve_devices",
    "HYPERPARAMETER_IDS",
    "step_hashes",
]

logger = logging.getLogger(__name__)

#: MLflow param -> bundle config id read from the merged config (the method's options); ``lambda`` is the
#: engine's ``unsup_weight_max`` the bundle itself logs as ``unsup_weight``
HYPERPARAMETER_IDS = {
    "tau": "method#confidence_threshold", "T": "method#temperature",
    "qw_mode": "method#qw_mode", "qw_tau": "method#qw_threshold",
}  # fmt: skip
VAL_METRIC_CANDIDATES = ("val_mean_dice", "val_dice", "val_dsc")


@dataclass
class Launch:
    """How bundle calls run: ``inprocess`` / ``subprocess``, extra environment, ``torchrun`` processes."""

    launcher: str = "inprocess"
    ddp_nproc: int = 1
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class BundleCall:
    """One ``monai.bundle run`` of a bundle folder with stacked config files and overrides."""

    bundle_dir: Path
    config_files: list[str]
    overrides: dict[str, Any]
    tracking: dict[str, Any] | None = None

    def args(self) -> dict[str, Any]:
        configs = self.bundle_dir / "configs"
        missing = [name for name in self.config_files if not (configs / name).is_file()]
        if missing:
            raise FileNotFoundError(f"bundle {self.bundle_dir.name}: config file(s) {missing} not found in {configs}")
        args: dict[str, Any] = {"config_file": [str(configs / name) for name in self.config_files]}
        if (configs / "metadata.json").is_file():
            args["meta_file"] = str(configs / "metadata.json")
        if (configs / "logging.conf").is_file():
            args["logging_file"] = str(configs / "logging.conf")
        if self.tracking is not None:
            args["tracking"] = self.tracking
        args.update(self.overrides)
        return args

    def run(self, args_path: Path, launch: Launch) -> None:
        """Write the args file and execute it. Raises on failure (non-zero exit or exception)."""
        args_path.parent.mkdir(parents=True, exist_ok=True)
        args_path.write_text(json.dumps(self.args(), indent=1, default=str))
        if launch.launcher == "inprocess" and launch.ddp_nproc <= 1:
            from monai.bundle import run as bundle_run

            saved = {key: os.environ.get(key) for key in launch.env}
            os.environ.update(launch.env)  # MONAI's MLFlowHandler prefers MLFLOW_TRACKING_URI over its argument
            try:
                with known_notices_filtered():
                    bundle_run(args_file=str(args_path))
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
            return
        # `python -m monai.bundle run --args_file` with MONAI's known notices filtered (bundle_main)
        bundle_main = ["-m", "qgssl_monai.experiments.bundle_main", "--args_file", str(args_path)]
        if launch.ddp_nproc > 1:
            argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={launch.ddp_nproc}", *bundle_main]
        else:
            argv = [sys.executable, *bundle_main]
        env = {**os.environ, **launch.env}
        code = subprocess.call(argv, env=env)
        if code != 0:
            raise RuntimeError(f"bundle run {args_path} exited with code {code}")


def git_commit(repo: str | Path) -> str:
    """``git rev-parse HEAD`` of ``repo`` (``unknown`` outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_devices(devices: str | Sequence[int]) -> list[int]:
    """GPU indices to fan SSL runs out over (empty list: CPU, sequential)."""
    if devices == "cpu":
        return []
    if devices == "auto":
        import torch

        return list(range(torch.cuda.device_count()))
    return [int(d) for d in devices]


def prepare_manifest(cfg: ExperimentConfig, out_file: Path) -> dict[str, Any]:
    """Write the combined manifest the bundles read and validate every file it lists.

    ``training``/``validation``/``test`` come from ``data.labeled``; with ``data.num_labeled`` only that many
    training cases (a ``split_seed`` permutation) stay labeled and the rest join the unlabeled pool. The
    pool is ``data.unlabeled``'s ``unlabeled`` list, or, when it has none and is a different manifest (e.g.
    Kvasir-SEG as the unlabeled set of a CVC-ClinicDB experiment), the images of all its splits.
    Paths are written relative to the common folder of all images.

    Returns:
        header facts logged as params: ``dataset``, ``label_count``, ``unlabeled_count``, ...

    Raises:
        qgssl_monai.data.manifest.ManifestError: a manifest or a file it lists is missing or bad.
    """
    from qgssl_monai.data.manifest import ManifestError, load_manifest, load_split, write_manifest
    from qgssl_monai.data.validation import assert_valid_manifest

    data = cfg.data
    splits = {s: load_split(data.labeled, s, data.labeled_root) for s in ("training", "validation", "test")}
    for split in splits:
        if not splits[split]:
            raise ManifestError(f"experiment {cfg.name}: labeled manifest {data.labeled} has an empty '{split}' split")
    unlabeled = load_split(data.unlabeled, "unlabeled", data.unlabeled_root)
    if not unlabeled and Path(data.unlabeled).resolve() != Path(data.labeled).resolve():
        unlabeled = [
            {"image": e["image"]}
            for split in ("training", "validation", "test")
            for e in load_split(data.unlabeled, split, data.unlabeled_root)
        ]
    training = splits["training"]
    if data.num_labeled is not None:
        if data.num_labeled > len(training):
            raise ManifestError(f"data.num_labeled={data.num_labeled} exceeds the {len(training)} training cases of {data.labeled}")
        order = np.random.default_rng(data.split_seed).permutation(len(training))
        keep = set(order[: data.num_labeled].tolist())
        unlabeled = [{"image": e["image"]} for i, e in enumerate(training) if i not in keep] + unlabeled
        training = [e for i, e in enumerate(training) if i in keep]
    splits["training"] = training
    splits["unlabeled"] = [{"image": e["image"]} for e in unlabeled]
    every = [e[k] for entries in splits.values() for e in entries for k in ("image", "label") if k in e]
    root = Path(os.path.commonpath([os.path.dirname(p) for p in every]))
    header = load_manifest(data.labeled)
    name = data.name or header.get("name") or Path(data.labeled).stem
    unlabeled_name = load_manifest(data.unlabeled).get("name", Path(data.unlabeled).stem)
    write_manifest(
        out_file,
        splits,
        data_root=root,
        name=name,
        modality=str(header.get("modality", "")),
        source=f"labeled: {data.labeled}; unlabeled: {data.unlabeled}",
        citation=str(header.get("citation", "")),
        licence=str(header.get("licence", "")),
        split_seed=header.get("split_seed"),
        split_rule=f"labeled splits of {Path(data.labeled).name}; num_labeled={data.num_labeled} (seed {data.split_seed})",
        extra={"experiment": cfg.name},
    )
    assert_valid_manifest(out_file)
    return {
        "dataset": name,
        "unlabeled_dataset": unlabeled_name,
        "label_count": len(training),
        "unlabeled_count": len(splits["unlabeled"]),
        "validation_count": len(splits["validation"]),
        "test_count": len(splits["test"]),
    }


def _tracking_settings(tracking_uri: str, experiment_name: str, run_name: str) -> dict[str, Any]:
    """MONAI's default MLflow settings aimed at one run, which the runner (not the handler) finishes.

    The handlers are ``ResilientMLFlowHandler``: a tracking server going away mid-run costs one bounded failed
    request per 30 s and a warning; the values are buffered and sent when it is back (or spilled to the step's
    ``eval`` folder at the end).
    """
    from qgssl_monai.handlers.tracking import resilient_mlflow_settings

    # epoch means are enough (iteration_log off), and keep SQLite writes few
    return resilient_mlflow_settings(tracking_uri, experiment_name, run_name, close_on_complete=False, iteration_log=False)


def _merged_config_values(bundle_dir: Path, config_files: Sequence[str], overrides: Mapping[str, Any], ids: Mapping[str, str]) -> dict[str, Any]:
    """Raw values of ``ids`` in the stacked configs + overrides (``"default"`` when unset)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle_dir / "configs" / f) for f in config_files])
    parser.update(dict(overrides))
    values = {}
    for name, config_id in ids.items():
        values[name] = parser.get(config_id, "default")
    return values


class ExperimentPipeline:
    """Builds the steps of one experiment (see the module docstring).

    Args:
        cfg: the validated experiment.
        output_dir: the experiment's output folder.
        tracking_uri: MLflow tracking URI.
        launch: how bundle calls are executed.
    """

    def __init__(self, cfg: ExperimentConfig, output_dir: str | Path, tracking_uri: str, launch: Launch | None = None) -> None:
        self.cfg = cfg
        self.out = Path(output_dir).resolve()
        self.tracking_uri = tracking_uri
        self.launch = launch or Launch()
        self.bundles = Path(cfg.bundles_dir)
        self.manifest = self.out / "data" / "manifest.json"
        self.quality_models = self.out / "quality" / "models"
        self.quality_eval = self.out / "quality" / "eval"
        self.repo = self.bundles.parent
        self._commit: str | None = None
        self.data_facts: dict[str, Any] = {}

    @property
    def commit(self) -> str:
        if self._commit is None:
            self._commit = git_commit(self.repo)
        return self._commit

    # -- shared pieces ------------------------------------------------------------------------------------
    def preprocessing_cache_dir(self) -> Path:
        """``<out>/cache/<key>``: the SSL runs' shared disk cache of decoded, resized images.

        The key hashes the manifest, the preprocessing code and the MONAI version, so a change to any of
        them starts a fresh cache instead of reusing stale tensors.
        """
        import monai

        from qgssl_monai.experiments.config import stable_hash
        from qgssl_monai.transforms import io as transforms_io

        manifest = self.manifest.read_text() if self.manifest.is_file() else None
        key = stable_hash({"manifest": manifest, "io": Path(transforms_io.__file__).read_text(), "monai": monai.__version__})
        return self.out / "cache" / key[:12]

    def common_overrides(self) -> dict[str, Any]:
        overrides: dict[str, Any] = {
            "dataset_dir": str(self.manifest.parent),
            "manifest": str(self.manifest),
            "data_root": None,
            "image_size": self.cfg.image_size,
        }
        if self.cfg.execution.devices == "cpu":  # else the bundles pick cuda:0 (the pinned GPU) when present
            overrides["device"] = "$torch.device('cpu')"
        return overrides

    def _call(self, ctx: StepContext, call: BundleCall, stage: str, step_dir: Path) -> Path:
        run_name = ctx.tracker.client.get_run(ctx.run_id).info.run_name
        call.tracking = _tracking_settings(self.tracking_uri, self.cfg.name, run_name)
        call.overrides.update(tracking_uri=self.tracking_uri, experiment_name=self.cfg.name, run_name=run_name)
        args_path = step_dir / "bundle_args" / f"{stage}.json"
        launch = Launch(self.launch.launcher, self.launch.ddp_nproc, {**self.launch.env, "MLFLOW_TRACKING_URI": self.tracking_uri})
        call.run(args_path, launch)
        ctx.tracker.log_artifact(ctx.run_id, args_path, "config")
        return args_path

    def _log_common(self, ctx: StepContext, extra: Mapping[str, Any]) -> None:
        facts = self.data_facts or self._facts_from_manifest()
        params = {
            "experiment": self.cfg.name,
            "experiment_config_hash": self.cfg.config_hash,
            "git_commit": self.commit,
            "image_size": self.cfg.image_size,
            "dataset": facts.get("dataset"),
            "label_count": facts.get("label_count"),
            "unlabeled_count": facts.get("unlabeled_count"),
            **extra,
        }
        ctx.tracker.log_params(ctx.run_id, params)

    def _facts_from_manifest(self) -> dict[str, Any]:
        if not self.manifest.is_file():
            return {}
        header = json.loads(self.manifest.read_text())
        return {"dataset": header.get("name"), "label_count": header.get("num_training"), "unlabeled_count": header.get("num_unlabeled")}

    # -- steps --------------------------------------------------------------------------------------------
    def steps(self) -> list[Step]:
        cfg = self.cfg
        q_over = {**(cfg.overrides.get("global") or {}), **(cfg.overrides.get("quality") or {}), **cfg.quality.overrides}
        weak_epochs = list(cfg.quality.weak_epochs)
        steps = [
            Step(
                "data:prepare",
                "prepare",
                {"data": cfg.to_dict()["data"], "manifests": self._file_digest([cfg.data.labeled, cfg.data.unlabeled])},
                self._prepare,
                outputs=[str(self.manifest)],
            )
        ]
        quality_ckpt = cfg.quality.checkpoint or str(self.quality_models / "model.pt")
        quality_deps: list[str] = []
        if cfg.quality.checkpoint is None and any(is_quality_guided(m) for m in [*cfg.methods, *cfg.sweep.methods]):
            from qgssl_monai.transforms.weak import weak_snapshot_filename

            from qgssl_monai.quality.oof import oof_index_path

            train = {"max_epochs": cfg.quality.epochs, "seed": 0, "type2": cfg.quality.type2, **q_over}
            if cfg.quality.type2 == "out_of_fold":
                # the fold networks train with train_weak.json, so its content is part of the step's identity
                oof = {"seed": 0, **q_over, **cfg.quality.oof}
                digest = self._config_digest("quality_predictor", ["train_oof.json", "train_weak.json"])
                steps.append(
                    Step("quality:oof", "oof", {"configs": digest, **oof},
                         self._bundle_action("quality_predictor", ["train_oof.json"], oof, self.out / "quality", "oof"),
                         outputs=[str(oof_index_path(self.quality_models / "oof", cfg.image_size))], deps=["data:prepare"])
                )  # fmt: skip
            else:
                weak = {"weak_epochs": weak_epochs, "seed": 0, **q_over}
                steps.append(
                    Step("quality:weak", "weak", {"configs": self._config_digest("quality_predictor", ["train_weak.json"]), **weak},
                         self._bundle_action("quality_predictor", ["train_weak.json"], weak, self.out / "quality", "weak"),
                         outputs=[str(self.quality_models / "weak" / weak_snapshot_filename(max(weak_epochs)))], deps=["data:prepare"])
                )  # fmt: skip
            type2_step = "quality:oof" if cfg.quality.type2 == "out_of_fold" else "quality:weak"
            steps += [
                Step("quality:train", "quality_train", {"configs": self._config_digest("quality_predictor", ["train.json"]), **train},
                     self._bundle_action("quality_predictor", ["train.json"], train, self.out / "quality", "train"),
                     outputs=[quality_ckpt], deps=["data:prepare", type2_step]),
                Step("quality:evaluate", "quality_eval", {"configs": self._config_digest("quality_predictor", ["evaluate.json"]), **q_over},
                     self._quality_evaluate_action(q_over),
                     outputs=[str(self.quality_eval / "quality_metrics.json")], deps=["quality:train"]),
            ]  # fmt: skip
            quality_deps = ["quality:train"]
        for method in cfg.methods:
            for network in cfg.networks:
                for seed in cfg.seeds:
                    steps.append(self._ssl_step(method, network, seed, quality_ckpt, quality_deps))
        grid = {step.key for step in steps}
        for method in cfg.sweep.methods:  # validation-only sweep variants beside the grid
            for network in cfg.sweep_networks:
                for seed in cfg.sweep_seeds:
                    if f"ssl:{method}:{network}:{seed}" not in grid:
                        steps.append(self._ssl_step(method, network, seed, quality_ckpt, quality_deps))
        if quality_deps:  # g was trained here: score it on the SSL networks' test predictions
            steps += [self._real_predictions_step(network, quality_ckpt, q_over) for network in cfg.networks]
        return steps

    @staticmethod
    def _file_digest(paths: Sequence[str | None]) -> dict[str, str | None]:
        """Path -> content hash (None when missing), so an edited manifest reruns ``data:prepare`` and all after it."""
        from qgssl_monai.experiments.config import stable_hash

        return {str(p): (stable_hash(Path(p).read_text()) if p and Path(p).is_file() else None) for p in paths}

    def _config_digest(self, bundle: str, files: Sequence[str]) -> dict[str, str]:
        """File name -> content of the bundle configs used, so editing a bundle config reruns its steps."""
        from qgssl_monai.experiments.config import stable_hash

        configs = self.bundles / bundle / "configs"
        return {f: stable_hash((configs / f).read_text() if (configs / f).is_file() else None) for f in files}

    def _prepare(self, ctx: StepContext) -> None:
        self.data_facts = prepare_manifest(self.cfg, self.manifest)
        self._log_common(ctx, {"labeled_manifest": self.cfg.data.labeled, "unlabeled_manifest": self.cfg.data.unlabeled})

    def _bundle_action(self, bundle: str, files: list[str], overrides: dict[str, Any], step_dir: Path, stage: str):
        def action(ctx: StepContext) -> None:
            call_overrides = {
                "bundle_root": str(self.bundles / bundle),
                "ckpt_dir": str(self.quality_models),
                "output_dir": str(self.quality_eval / stage),
                **self.common_overrides(),
                **overrides,
            }
            self._call(ctx, BundleCall(self.bundles / bundle, list(files), call_overrides), stage, step_dir)
            self._log_common(ctx, {"stage": stage})

        return action

    def _quality_evaluate_action(self, overrides: dict[str, Any]):
        def action(ctx: StepContext) -> None:
            call_overrides = {
                "bundle_root": str(self.bundles / "quality_predictor"),
                "ckpt_dir": str(self.quality_models),
                "output_dir": str(self.quality_eval),
                **self.common_overrides(),
                **overrides,
            }
            self._call(ctx, BundleCall(self.bundles / "quality_predictor", ["evaluate.json"], call_overrides), "evaluate", self.out / "quality")
            self._log_common(ctx, {"stage": "evaluate"})
            metrics = json.loads((self.quality_eval / "quality_metrics.json").read_text())
            flat = {f"quality_heldout_{k}": v for k, v in metrics.get("heldout_corruptions", {}).items() if isinstance(v, (int, float))}
            pooled = metrics.get("segmentation_predictions", {}).get("pooled", {})
            flat.update({f"quality_segmentation_{k}": v for k, v in pooled.items() if isinstance(v, (int, float))})
            zeroing = metrics.get("image_zeroing", {})
            flat.update({f"quality_image_zeroing_{k}": v for k, v in zeroing.items() if isinstance(v, (int, float))})
            ctx.tracker.log_metrics(ctx.run_id, flat)
            ctx.tracker.log_artifact(ctx.run_id, self.quality_eval / "quality_metrics.json", "quality")
            scores = self.quality_eval / "segmentation_scores.csv"
            if scores.is_file():  # predicted quality vs true Dice of network predictions on the test set
                import pandas as pd

                table = pd.read_csv(scores).rename(columns={"predicted_dice": "predicted"})
                target = self.quality_eval / "report" / Path(QUALITY_ARTIFACT).name
                target.parent.mkdir(parents=True, exist_ok=True)
                table.to_csv(target, index=False)
                ctx.tracker.log_artifact(ctx.run_id, target, str(Path(QUALITY_ARTIFACT).parent))
            for png in sorted(self.quality_eval.glob("*.png")):
                ctx.tracker.log_artifact(ctx.run_id, png, "quality")

        return action

    def _real_predictions_step(self, network: str, quality_ckpt: str, overrides: dict[str, Any]) -> Step:
        """g (``quality_ckpt``) on the test-split predictions of every SSL model of ``network``.

        None of these networks is part of g's training mix (that holds corruptions of true masks and weak
        snapshots), so this is what g's weights mean on pseudo-labels: the evaluation bundle's pooled and
        per-model Pearson, Spearman, MAE, bias, fraction over-estimated and AUROC(true Dice >= 0.7).
        """
        cfg = self.cfg
        ssl_keys = [f"ssl:{m}:{network}:{seed}" for m in cfg.methods for seed in cfg.seeds]
        out_dir = self.quality_eval / "real_predictions" / network
        config = {"configs": self._config_digest("quality_predictor", ["evaluate.json"]), "network": network,
                  "sources": ssl_keys, **overrides}  # fmt: skip

        def action(ctx: StepContext) -> None:
            links = out_dir / "models"
            links.mkdir(parents=True, exist_ok=True)
            sources = []
            for method in cfg.methods:
                for seed in cfg.seeds:
                    model = self.ssl_dir(method, network, seed) / "models" / "model.pt"
                    link = links / f"{method}_seed{seed}.pt"  # the file stem names the source in the scores
                    link.unlink(missing_ok=True)
                    link.symlink_to(model)
                    sources.append(str(link))
            call_overrides = {
                "bundle_root": str(self.bundles / "quality_predictor"),
                "ckpt_path": quality_ckpt,
                "output_dir": str(out_dir),
                **self.common_overrides(),
                **overrides,
                "samples_per_image": 1,  # the corruption part repeats quality:evaluate: keep it small
                "seg_checkpoints": sources,
                "seg_network_def": {
                    "_target_": "qgssl_monai.networks.segmentation.build_segmentation_network",
                    "name": network,
                    "size": cfg.network_size,
                    "in_channels": int(overrides.get("image_channels", 3)),
                    "out_channels": 1,
                    "spatial_dims": 2,
                },
            }
            call = BundleCall(self.bundles / "quality_predictor", ["evaluate.json"], call_overrides)
            self._call(ctx, call, "evaluate", out_dir)
            self._log_common(ctx, {"stage": "real_predictions", "network": network})
            metrics = json.loads((out_dir / "quality_metrics.json").read_text())
            pooled = metrics.get("segmentation_predictions", {}).get("pooled", {})
            ctx.tracker.log_metrics(ctx.run_id, {f"quality_real_{k}": v for k, v in pooled.items() if isinstance(v, (int, float))})
            ctx.tracker.log_artifact(ctx.run_id, out_dir / "quality_metrics.json", "quality")
            import pandas as pd

            table = pd.read_csv(out_dir / "segmentation_scores.csv").rename(columns={"predicted_dice": "predicted"})
            table.insert(0, "network", network)
            target = out_dir / "report" / Path(REAL_PREDICTIONS_ARTIFACT).name
            target.parent.mkdir(parents=True, exist_ok=True)
            table.to_csv(target, index=False)
            ctx.tracker.log_artifact(ctx.run_id, target, str(Path(REAL_PREDICTIONS_ARTIFACT).parent))
            ctx.tracker.log_artifact(ctx.run_id, out_dir / "segmentation_scatter.png", "quality")

        return Step(
            f"quality:real:{network}",
            "quality_real",
            config,
            action,
            outputs=[str(out_dir / "quality_metrics.json")],
            deps=["quality:train", *ssl_keys],
            tags={"qgssl_network": network},
        )

    def ssl_dir(self, method: str, network: str, seed: int) -> Path:
        return self.out / "ssl" / method / network / f"seed{seed}"

    def _ssl_files(self, method: str, network: str) -> list[str]:
        files = ["train.json", f"method/{overlay_of(method)}.json", f"net/{network}.json"]
        if self.launch.ddp_nproc > 1:
            files.append("multi_gpu_train.json")
        return files

    def _ssl_step(self, method: str, network: str, seed: int, quality_ckpt: str, quality_deps: list[str]) -> Step:
        cfg = self.cfg
        run_dir = self.ssl_dir(method, network, seed)
        overrides = {
            "seed": seed,
            "num_epochs": cfg.epochs,
            "network_size": cfg.network_size,
            **cfg.ssl_overrides(method, network),
        }
        guided = is_quality_guided(method)
        if guided:
            overrides["quality_ckpt"] = quality_ckpt
        files = self._ssl_files(method, network)
        config = {"configs": self._config_digest("ssl_segmentation", files), "overrides": overrides, "image_size": cfg.image_size}
        if guided and cfg.quality.checkpoint:
            config["quality_checkpoint"] = cfg.quality.checkpoint

        def action(ctx: StepContext) -> None:
            from qgssl_monai.segmentation.training import latest_checkpoint

            ckpt_dir, eval_dir = run_dir / "models", run_dir / "eval"
            resume = ctx.resume and latest_checkpoint(ckpt_dir, required=False) is not None
            if not resume and ckpt_dir.exists():
                shutil.rmtree(ckpt_dir)  # leftovers of another config must not be resumed or reported
            call_overrides = {
                "bundle_root": str(self.bundles / "ssl_segmentation"),
                "ckpt_dir": str(ckpt_dir),
                "output_dir": str(eval_dir),
                "persistent_cache_dir": str(self.preprocessing_cache_dir()),
                **self.common_overrides(),
                **overrides,
                "resume": resume,
            }
            call = BundleCall(self.bundles / "ssl_segmentation", files, call_overrides)
            self._call(ctx, call, "train", run_dir)
            self._finish_ssl(ctx, method, network, seed, run_dir, files, call_overrides)

        return Step(
            f"ssl:{method}:{network}:{seed}",
            "ssl",
            config,
            action,
            outputs=[str(run_dir / "models" / "model.pt"), str(run_dir / "eval" / "test_metrics_per_image.csv")],
            deps=["data:prepare", *quality_deps] if guided else ["data:prepare"],
            tags={"qgssl_method": method, "qgssl_network": network, "qgssl_seed": str(seed)},
        )

    def _finish_ssl(
        self, ctx: StepContext, method: str, network: str, seed: int, run_dir: Path, files: Sequence[str], overrides: Mapping[str, Any]
    ) -> None:
        """Log what the report needs on top of what the bundle's MLflow handlers logged."""
        import pandas as pd

        from qgssl_monai.metrics import summarize_metrics

        tracker, run_id = ctx.tracker, ctx.run_id
        per_image = run_dir / "eval" / "test_metrics_per_image.csv"
        if not per_image.is_file():
            raise FileNotFoundError(f"{ctx.step.key}: the bundle wrote no per-image test metrics ({per_image})")
        table = pd.read_csv(per_image).rename(columns={"dice": "dsc"})
        summary = summarize_metrics({name: table[name].to_numpy(float) for name in ("dsc", "iou", "hd95", "asd")})
        metrics = {}
        for name, stats in summary.items():
            metrics[f"test_{name}_mean"], metrics[f"test_{name}_se"] = stats["mean"], stats["se"]
        tracker.log_metrics(run_id, metrics)
        target = run_dir / "eval" / "report" / Path(PER_IMAGE_ARTIFACT).name
        target.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(target, index=False)
        tracker.log_artifact(run_id, target, str(Path(PER_IMAGE_ARTIFACT).parent))
        tracker.log_artifact(run_id, run_dir / "models" / "model.pt", "models")
        for executed in sorted((run_dir / "eval").glob("config_*.json"))[-1:]:
            tracker.log_artifact(run_id, executed, "config")
        for candidate in VAL_METRIC_CANDIDATES:
            history = tracker.metric_history(run_id, candidate)
            if history:
                if candidate != "val_dsc":
                    for step, value in history:
                        tracker.log_metrics(run_id, {"val_dsc": value}, step=step)
                break
        params = tracker.client.get_run(run_id).data.params
        hyper = _merged_config_values(self.bundles / "ssl_segmentation", files, overrides, HYPERPARAMETER_IDS)
        self._log_common(
            ctx,
            {
                "method": method,
                "network": network,
                "seed": seed,
                "lambda": params.get("unsup_weight", overrides.get("unsup_weight", "default")),
                **hyper,
                "epochs": self.cfg.epochs,
            },
        )


def resolve_output(cfg: ExperimentConfig, output: str | Path | None) -> Path:
    """``--output`` > the YAML's ``output`` > ``runs/<name>`` (relative to the cwd)."""
    return Path(output or cfg.output or Path("runs") / cfg.name).resolve()


def _launch_for(cfg: ExperimentConfig, gpus: Sequence[int]) -> Launch:
    launcher = cfg.execution.launcher
    if launcher == "auto":
        launcher = "subprocess" if len(gpus) > 1 or cfg.execution.ddp_nproc > 1 else "inprocess"
    return Launch(launcher=launcher, ddp_nproc=cfg.execution.ddp_nproc)


def write_resolved(cfg: ExperimentConfig, out: Path) -> Path:
    """``<out>/experiment.yaml``: the validated experiment with absolute paths (what GPU workers re-read)."""
    import yaml

    content = cfg.to_dict()
    content.pop("source", None)
    path = out / "experiment.yaml"
    text = yaml.safe_dump(content, sort_keys=False)
    if path.is_file() and path.read_text() == text:
        return path  # CPU/GPU workers re-run this on the file they were started with: leave it alone
    # atomic: a worker starting now must never read a half-written file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def run_experiment(
    cfg: ExperimentConfig,
    output: str | Path | None = None,
    tracking_uri: str | None = None,
    only: Sequence[str] | None = None,
    dry_run: bool = False,
    report: bool = True,
) -> int:
    """Run (or with ``dry_run`` list) the experiment's steps, then write the report.

    With several GPUs (and ``ddp_nproc == 1``) the runnable SSL runs fan out, one worker subprocess per
    GPU (``qgssl experiment run <out>/experiment.yaml --only <key>`` pinned with ``CUDA_VISIBLE_DEVICES``);
    otherwise everything runs sequentially.

    Returns:
        0 when every selected step is done or skipped, 1 when one failed or was blocked.
    """
    from qgssl_monai.experiments.runner import WORKER_ENV, ExperimentRunner, run_subprocess_pool
    from qgssl_monai.experiments.tracking import StepTracker, default_tracking_uri

    out = resolve_output(cfg, output)
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or default_tracking_uri(out)
    resolved = write_resolved(cfg, out)
    gpus = resolve_devices(cfg.execution.devices)
    launch = _launch_for(cfg, gpus)
    pipeline = ExperimentPipeline(cfg, out, uri, launch)
    runner = ExperimentRunner(pipeline.steps(), StepTracker(uri, cfg.name), cfg.config_hash)
    parallel = None
    slots: list[int | str] = list(gpus)
    threads = None
    if not gpus and cfg.execution.cpu_workers > 1:
        slots = ["cpu"] * cfg.execution.cpu_workers
        threads = max(1, (os.cpu_count() or 1) // cfg.execution.cpu_workers)
    if len(slots) > 1 and cfg.execution.ddp_nproc == 1 and not os.environ.get(WORKER_ENV):

        def fan_out(batch: list[Step]) -> dict[str, bool]:
            commands = {
                s.key: [sys.executable, "-m", "qgssl_monai.cli", "experiment", "run", str(resolved), "--output", str(out),
                        "--tracking-uri", uri, "--only", s.key, "--no-report"]
                for s in batch
            }  # fmt: skip
            return run_subprocess_pool(commands, slots, log_dir=out / "logs", threads_per_worker=threads)

        parallel = fan_out

    decisions = runner.run(only=only, dry_run=dry_run, parallel=parallel)
    width = max((len(d.step.key) for d in decisions), default=10)
    print(f"experiment {cfg.name} -> {out} (MLflow {uri})")
    for d in decisions:
        print(f"  {d.action:8s} {d.step.key:{width}s}  {d.reason}")
    if dry_run:
        return 0
    bad = [d.step.key for d in decisions if d.action in ("failed", "blocked")]
    if report:
        page = report_experiment(cfg, out, uri)
        print(f"report: {page}")
    if bad:
        print(f"not completed: {', '.join(bad)} (rerun the same command to resume)")
    return 1 if bad else 0


def step_hashes(cfg: ExperimentConfig, out: Path, tracking_uri: str) -> dict[str, str]:
    """Step key -> step hash of ``cfg``'s current plan (what :func:`load_results` matches runs against)."""
    from qgssl_monai.experiments.runner import ExperimentRunner
    from qgssl_monai.experiments.tracking import StepTracker

    runner = ExperimentRunner(ExperimentPipeline(cfg, out, tracking_uri).steps(), StepTracker(tracking_uri, cfg.name), cfg.config_hash)
    return {key: step.hash for key, step in runner.by_key.items()}


def report_experiment(
    cfg: ExperimentConfig, output: str | Path | None = None, tracking_uri: str | None = None, sweep: Any = None
) -> Path:
    """Write ``<out>/report/`` from the experiment's FINISHED MLflow runs of the current plan (``sweep``: a
    precomputed sweep table to show, e.g. from before the sweep winners were written into ``cfg``; default:
    computed from ``cfg``)."""
    from qgssl_monai.experiments.report import (
        load_quality_metrics, load_quality_predictions, load_real_predictions, load_results, sweep_table, write_report,
    )
    from qgssl_monai.experiments.tracking import default_tracking_uri

    out = resolve_output(cfg, output)
    uri = tracking_uri or default_tracking_uri(out)
    hashes = step_hashes(cfg, out, uri)
    results = load_results(uri, cfg.name, hashes)
    quality = load_quality_predictions(uri, cfg.name, hashes)
    real = load_real_predictions(uri, cfg.name, hashes)
    return write_report(
        out / "report",
        experiment_name=cfg.name,
        methods=cfg.methods,
        networks=cfg.networks,
        results=results,
        quality_predictions=quality,
        real_predictions=real,
        paired=cfg.report.paired_test,
        convergence_fraction=cfg.report.convergence_fraction,
        target_val_dsc=cfg.report.target_val_dsc,
        title_note=f"config hash {cfg.config_hash}; tracking {uri}",
        sweep=sweep
        if sweep is not None or not cfg.sweep.methods
        else sweep_table(results, cfg.sweep.methods, cfg.sweep_networks, cfg.sweep_seeds, cfg.overrides.get("method") or {}),
        summary=cfg.report.summary,
        quality_metrics=load_quality_metrics(uri, cfg.name, hashes),
    )
