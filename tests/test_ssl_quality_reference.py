"""QAR/QW training checkpoints refer to g (path + SHA-256) instead of embedding it; resume checks the reference."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from qgssl_monai.methods.quality_weighting import QualityNetChangedError
from qgssl_monai.networks.quality import file_sha256
from ssl_bundle_utils import config_files, make_workflow, write_quality_checkpoint

pytestmark = pytest.mark.slow

METHODS = ("sup", "qar", "pl_qw", "qar_qw", "cps", "cps_qw")


def _train(method: str, manifest: Path, out: Path, quality_ckpt: Path, **overrides) -> Path:
    workflow = make_workflow(config_files(f"method/{method}"), manifest, out, quality_ckpt=str(quality_ckpt), **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return out / "models" / "checkpoint_epoch=1.pt"


@pytest.fixture(scope="module")
def runs(demo_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny epoch per method (64 px, small U-Net, 2 steps), all with the same resnet18 g."""
    root = tmp_path_factory.mktemp("quality_reference")
    (root / "g").mkdir()
    g = write_quality_checkpoint(root / "g" / "model.pt")
    checkpoints = {method: _train(method, demo_manifest, root / method, g) for method in METHODS}
    return {"g": g, "root": root, **checkpoints}


def test_quality_guided_checkpoints_stay_within_twice_sup(runs: dict[str, Path]) -> None:
    sizes = {method: runs[method].stat().st_size for method in METHODS}
    g_size = runs["g"].stat().st_size
    print({**sizes, "g": g_size})
    for method in ("qar", "pl_qw", "qar_qw"):
        assert sizes[method] <= 2 * sizes["sup"], sizes
        assert sizes[method] < g_size / 4, sizes  # g's 45 MB of weights are not in there
    assert sizes["cps_qw"] <= 1.1 * sizes["cps"], sizes  # the peer is still saved; g is not

    sha = file_sha256(runs["g"])
    for method in ("qar", "pl_qw", "qar_qw", "cps_qw"):
        saved = torch.load(runs[method], weights_only=True)["method"]
        assert not any("quality_net." in key for key in saved), method
        references = [value for key, value in saved.items() if key.endswith("quality_net_reference")]
        assert references and all(r == {"path": str(runs["g"].resolve()), "sha256": sha} for r in references), method
    cps_qw = torch.load(runs["cps_qw"], weights_only=True)["method"]
    assert any(key.startswith("peer.") for key in cps_qw)


def test_resume_checks_the_reference_to_g(runs: dict[str, Path], demo_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "qar"
    shutil.copytree(runs["qar"].parent, out / "models")
    g = tmp_path / "g" / "model.pt"
    g.parent.mkdir()
    shutil.copy(runs["g"], g)
    shutil.copy(runs["g"].with_name("model.meta.json"), g.with_name("model.meta.json"))
    settings = {"quality_ckpt": str(g), "resume": True, "num_epochs": 2}

    # the same g (copied elsewhere: same SHA-256) resumes
    workflow = make_workflow(config_files("method/qar"), demo_manifest, out, **settings)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    assert (out / "models" / "checkpoint_epoch=2.pt").is_file()

    # another g under the same path: refused with one line naming both
    write_quality_checkpoint(g, seed=1)
    shutil.copytree(runs["qar"].parent, tmp_path / "changed" / "models")
    workflow = make_workflow(config_files("method/qar"), demo_manifest, tmp_path / "changed", **settings)
    workflow.initialize()
    with pytest.raises(RuntimeError) as err:  # MONAI wraps what a config expression raises
        workflow.run()
    cause = err.value.__cause__
    assert isinstance(cause, QualityNetChangedError)
    message = str(cause)
    assert message.startswith("the quality predictor g changed since this checkpoint was saved") and "\n" not in message
    assert str(runs["g"].resolve()) in message and str(g.resolve()) in message

    # g missing: one line naming the path
    g.unlink()
    with pytest.raises(RuntimeError) as err:
        make_workflow(config_files("method/qar"), demo_manifest, tmp_path / "changed", **settings).initialize()
    cause = err.value.__cause__
    # the bundle checks g up front: one line naming the path and the commands that train g
    assert isinstance(cause, FileNotFoundError) and str(cause).startswith(f"checkpoint not found: {g}; ")
    assert "\n" not in str(cause) and "train.json" in str(cause)
