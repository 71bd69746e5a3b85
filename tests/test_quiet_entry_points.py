"""A normal run is quiet: MONAI's two known bundle notices are filtered at the project's entry points only
(``qgssl``, the experiment runner's bundle calls), real warnings stay visible, and ``experiment report`` draws
no MLflow "Downloading artifacts" bar per file.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from qgssl_monai import cli
from qgssl_monai.experiments.bundle_main import known_notices_filtered
from qgssl_monai.experiments.pipeline import BundleCall, Launch

TRUST = "Only proceed if this config is from a source you trust"
CONFIG_ROOT = "Not all config files are in"
OTHER_MONAI_NOTICE = "Default logging file"  # same MONAI logger, not filtered


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def monai_log() -> Iterator[list[str]]:
    """What MONAI's bundle-workflow logger lets through (its own handler writes to the stdout of import time)."""
    handler = _Collect()
    logger = logging.getLogger("monai.bundle.workflows")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def _has(messages: list[str], text: str) -> bool:
    return any(text in m for m in messages)


def _bundle(root: Path) -> Path:
    """A tiny bundle whose run prints ``ran 2``, stacked from configs/ and a sub-folder overlay, as the SSL bundle."""
    (root / "configs" / "method").mkdir(parents=True)
    (root / "configs" / "train.json").write_text(json.dumps({"initialize": [], "run": ["$print('ran', @b)"], "finalize": []}))
    (root / "configs" / "method" / "x.json").write_text(json.dumps({"b": 2}))
    (root / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0"}))
    return root


def _monai_notices_and_a_real_warning(root: Path) -> None:
    from monai.bundle.scripts import create_workflow

    configs = root / "configs"
    create_workflow(config_file=[str(configs / "train.json"), str(configs / "method" / "x.json")], workflow_type=None)
    warnings.warn("an unrelated warning", UserWarning, stacklevel=1)


def test_notices_are_not_filtered_at_import(tmp_path: Path, monai_log: list[str]) -> None:
    """Library users (the library and the entry points are imported above) still see MONAI's notices."""
    root = _bundle(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _monai_notices_and_a_real_warning(root)
    assert any(TRUST in str(w.message) for w in caught)
    assert _has(monai_log, CONFIG_ROOT)


def test_filter_hides_exactly_the_known_notices(tmp_path: Path, monai_log: list[str]) -> None:
    root = _bundle(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with known_notices_filtered():
            _monai_notices_and_a_real_warning(root)
    messages = [str(w.message) for w in caught]
    assert "an unrelated warning" in messages and not _has(messages, TRUST)
    assert not _has(monai_log, CONFIG_ROOT) and _has(monai_log, OTHER_MONAI_NOTICE)
    # the filter is gone after the block
    monai_log.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _monai_notices_and_a_real_warning(root)
    assert _has([str(w.message) for w in caught], TRUST) and _has(monai_log, CONFIG_ROOT)


def test_cli_main_filters_and_keeps_real_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, monai_log: list[str]
) -> None:
    root = _bundle(tmp_path)
    parser = argparse.ArgumentParser()
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(func=lambda args: _monai_notices_and_a_real_warning(root))
    monkeypatch.setattr(cli, "build_parser", lambda argv: parser)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default: what a user's terminal shows
        assert cli.main([]) == 0
    messages = [str(w.message) for w in caught]
    assert "an unrelated warning" in messages and not _has(messages, TRUST)
    assert _has(monai_log, OTHER_MONAI_NOTICE) and not _has(monai_log, CONFIG_ROOT)


@pytest.mark.parametrize("launcher", ["inprocess", "subprocess"])
def test_runner_bundle_calls_are_quiet(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monai_log: list[str], launcher: str
) -> None:
    root = _bundle(tmp_path / "bundle")
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        BundleCall(root, ["train.json", "method/x.json"], {}).run(tmp_path / "args.json", Launch(launcher))
    out = capfd.readouterr()
    text = out.out + out.err + "\n".join(monai_log)  # a subprocess writes to the fds, this process to the logger
    assert "ran 2" in text and OTHER_MONAI_NOTICE in text  # it ran, and MONAI's other notices still show
    assert TRUST not in text and CONFIG_ROOT not in text


def test_report_draws_one_bar_not_one_per_artifact(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    import os

    import pandas as pd

    from qgssl_monai.experiments.report import PER_IMAGE_ARTIFACT, load_results
    from qgssl_monai.experiments.tracking import StepTracker, default_tracking_uri

    uri = default_tracking_uri(tmp_path)
    tracker = StepTracker(uri, "quiet-report")
    for seed in range(3):
        key = f"ssl:sup:unet:{seed}"
        run_id = tracker.create(key, {"qgssl_experiment": "quiet-report", "qgssl_kind": "ssl", "qgssl_step": key,
                                      "qgssl_method": "sup", "qgssl_network": "unet", "qgssl_seed": str(seed)})  # fmt: skip
        csv = tmp_path / f"seed{seed}" / Path(PER_IMAGE_ARTIFACT).name
        csv.parent.mkdir()
        pd.DataFrame({"image": ["a.png", "b.png"], "dsc": [0.5, 0.7 + 0.1 * seed]}).to_csv(csv, index=False)
        tracker.log_artifact(run_id, csv, str(Path(PER_IMAGE_ARTIFACT).parent))
        tracker.log_metrics(run_id, {"test_dsc_mean": 0.6, "test_iou_mean": 0.5})
        tracker.finish(run_id)
    capfd.readouterr()
    results = load_results(uri, "quiet-report", progress=True)
    err = capfd.readouterr().err
    assert [r.per_image["dsc"].iloc[1] for r in results] == pytest.approx([0.7, 0.8, 0.9])
    assert "Downloading artifacts" not in err
    assert "reading SSL runs from MLflow" in err and "3/3" in err
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ  # restored after the downloads
