"""Shared pytest fixtures: a small generated demo data set and the real-data folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from qgssl_monai.data.demo import generate_demo_dataset

# the small demo set every end-to-end test shares: 28/4/8 labeled split + 40 unlabeled, 64 px
DEMO_FIXTURE_SETTINGS = {"n_labeled": 40, "n_unlabeled": 40, "image_size": 64, "seed": 0}


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of ``manifest.json`` of a demo set (40 labeled, 40 unlabeled, 64 px, seed 0) generated once per session."""
    return generate_demo_dataset(tmp_path_factory.mktemp("demo_data"), **DEMO_FIXTURE_SETTINGS)


@pytest.fixture(scope="session")
def demo_root(demo_manifest: Path) -> Path:
    """Folder of the session demo set (the manifest's paths are relative to it)."""
    return demo_manifest.parent


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """``../shared/data`` beside the checkout (kvasir-seg, cvc-clinicdb); skips the test when absent."""
    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"real data folder {root} is absent")
    return root
