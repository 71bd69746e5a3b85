"""Every command in README.md's ``bash`` blocks runs as written (a README change that breaks one fails here).

The commands are read from README.md itself (``cd`` lines set the folder of the lines after them) and looked up
in ``COMMANDS``, a table saying how each one is exercised:

* ``Run``: executed in a scratch copy of the repository's ``bundles/``, ``data_manifests/`` and ``experiments/``
  (with ``../shared`` beside it when the real data exists), exactly as written except for the table's
  ``replace`` (e.g. the real-data manifest -> the generated demo manifest) and ``extra`` arguments (tiny
  settings: 64 px, one short epoch). ``realdata`` rows skip without ``../shared/data``. Rows run in table order
  within a test, because later commands use earlier outputs (g trained by the bundle rows, ...).
* ``NotRun``: commands that cannot run inside the test suite (``make test`` itself, a server, hours-long
  grids); the reason names what covers them. Their files must still exist.

A README command missing from the table (new or edited) fails ``test_every_readme_command_is_in_the_table``:
add or update its row.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
KVASIR_MANIFEST = "../../data_manifests/kvasir-seg.json"
# tiny settings appended to the bundle rows (the demo fixture is 64 px)
QUALITY_TINY = ["--image_size", "64", "--num_workers", "0", "--batch_size", "16", "--device", "$torch.device('cpu')"]
SSL_TINY = [
    "--image_size", "64", "--batch_size", "2", "--unlabeled_batch_size", "2", "--num_workers", "0",
    "--epoch_length", "2", "--network_size", "small", "--device", "$torch.device('cpu')",
]  # fmt: skip


@dataclass(frozen=True)
class Run:
    """Run the command; ``replace`` maps README text to test values, ``extra`` is appended."""

    replace: dict[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    realdata: bool = False
    expect_output: str = ""  # a regular expression searched in stdout+stderr, proving the command did its job
    # first run the command without ``--resume true`` (after deleting ``models/``), with these extra arguments
    killed_run: tuple[str, ...] | None = None


@dataclass(frozen=True)
class NotRun:
    """Not executed here; ``reason`` names what runs it instead."""

    reason: str


# README command (comments dropped, continuation lines joined, tokens separated by one space) -> how it is tested.
# ``{demo}`` in a value is the generated demo manifest.
COMMANDS: dict[str, Run | NotRun] = {
    # two commands
    "make demo": NotRun("the demo job itself (~10 min); tests/test_experiment_e2e.py runs the pipeline on a tiny grid"),
    "make test": NotRun("runs this test suite; CI runs it (.ci/run)"),
    # data
    "qgssl demo-data --out runs/demo/demo_data": Run(expect_output="wrote demo data set; manifest"),
    "qgssl prepare kvasir-seg --root ../shared/data/kvasir-seg --out data_manifests/kvasir-seg.json --data-root-base repo":
        Run(realdata=True, expect_output=r": OK \(700 training, 100 validation, 200 test"),
    "qgssl prepare cvc-clinicdb --root ../shared/data/cvc-clinicdb --unlabeled-root ../shared/data/kvasir-seg":
        Run(realdata=True, expect_output="1000 unlabeled"),
    "qgssl subset-labels data_manifests/cvc-clinicdb.json --fraction 0.25 --out data_manifests/cvc-clinicdb_labeled25.json":
        Run(realdata=True, expect_output="labeled groups: "),
    "qgssl validate-manifest data_manifests/kvasir-seg.json": Run(realdata=True, expect_output=r": OK \(700 training"),
    "qgssl validate-manifest data_manifests/cvc-clinicdb.json --skip-bad": Run(realdata=True, expect_output=r": OK \("),
    # bundles (cwd bundles/quality_predictor, then bundles/ssl_segmentation)
    f"python -m monai.bundle run --config_file configs/train_weak.json --bundle_root . --manifest {KVASIR_MANIFEST}":
        Run(replace={KVASIR_MANIFEST: "{demo}"}, extra=(*QUALITY_TINY, "--weak_epochs", "[1]")),
    f"python -m monai.bundle run --config_file configs/train.json --bundle_root . --manifest {KVASIR_MANIFEST} --tracking mlflow":
        Run(replace={KVASIR_MANIFEST: "{demo}"},
            extra=(*QUALITY_TINY, "--max_epochs", "1", "--samples_per_image", "2", "--val_samples_per_image", "1")),
    f"python -m monai.bundle run --config_file configs/evaluate.json --bundle_root . --manifest {KVASIR_MANIFEST}":
        Run(replace={KVASIR_MANIFEST: "{demo}"}, extra=(*QUALITY_TINY, "--samples_per_image", "1")),
    "python -m monai.bundle run --config_file ['configs/train.json','configs/method/qar.json','configs/net/swinunetr2d.json'] "
    f"--bundle_root . --manifest {KVASIR_MANIFEST} --quality_ckpt ../quality_predictor/models/model.pt":
        Run(replace={KVASIR_MANIFEST: "{demo}"}, extra=(*SSL_TINY, "--num_epochs", "1")),
    "python -m monai.bundle run --config_file ['configs/train.json','configs/method/pl_qw.json','configs/net/unet.json'] "
    f"--bundle_root . --manifest {KVASIR_MANIFEST} --resume true":
        # a 1-epoch run of the same configuration stands for the killed run; the resumed one adds epoch 2
        Run(replace={KVASIR_MANIFEST: "{demo}"}, extra=(*SSL_TINY, "--num_epochs", "2"),
            killed_run=(*SSL_TINY, "--num_epochs", "1")),
    "qgssl quality-check --image frame.png --mask frame_mask.png": Run(expect_output=r"(?m)^[01]\.\d{4}$"),
    "qgssl quality-check --csv pairs.csv --out scores.csv": Run(expect_output="scored 2 of 2 pairs -> scores.csv"),
    # experiments and MLflow
    "qgssl experiment run experiments/paper_polyp.yaml --dry-run": Run(realdata=True, expect_output="no run yet"),
    "qgssl experiment run experiments/paper_polyp.yaml": NotRun(
        "the full paper grid (days on CPU); its --dry-run row runs here, tests/test_experiment_e2e.py runs a tiny grid"
    ),
    "qgssl experiment report experiments/paper_polyp.yaml": Run(expect_output="report: "),
    "mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db": NotRun("starts a web server"),
    # MONAI Label
    "bash scripts/install_label.sh": NotRun("`make test` runs it (install-label) before the label server tests"),
    "PATH=$PWD/.venv-label/bin:$PATH monailabel start_server --app apps/quality_checker --studies DIR --conf models "
    "quality_predictor,ssl_segmentation --host 127.0.0.1 --port 8000":
        NotRun("starts a server; tests/test_label_server.py starts it in the label venv"),
    # benchmarks
    "OMP_NUM_THREADS=1 python benchmarks/bench_mask_generation.py --n 3000": NotRun("tests/test_benchmarks_smoke.py (--quick)"),
    "OMP_NUM_THREADS=1 python benchmarks/bench_engine_overhead.py": NotRun("tests/test_benchmarks_smoke.py (--quick)"),
    "OMP_NUM_THREADS=1 .venv-label/bin/python benchmarks/bench_label_load.py": NotRun("tests/test_benchmarks_smoke.py"),
    "OMP_NUM_THREADS=1 python benchmarks/bench_amp.py [--accuracy]": NotRun("tests/test_benchmarks_smoke.py (--quick)"),
    "OMP_NUM_THREADS=1 python benchmarks/bench_quality_check.py": NotRun("tests/test_benchmarks_smoke.py (--quick)"),
    "OMP_NUM_THREADS=1 python benchmarks/bench_scaling.py": NotRun("tests/test_benchmarks_smoke.py (--quick)"),
    "python benchmarks/bench_train_speed.py --json benchmarks/results/bench_train_speed.json": NotRun("tests/test_benchmarks_smoke.py (--quick)"),
    "OMP_NUM_THREADS=1 python benchmarks/bench_engine_overhead.py --fast": NotRun("tests/test_benchmarks_smoke.py (--quick)"),
}


def readme_commands(text: str) -> list[tuple[str, str]]:
    """``(folder relative to the repository, command)`` for every command line of the ``bash`` blocks."""
    commands: list[tuple[str, str]] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        cwd = "."
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if not tokens:
                continue
            if tokens[0] == "cd":
                cwd = os.path.normpath(os.path.join(cwd, tokens[1]))
                continue
            commands.append((cwd, " ".join(tokens)))
    return commands


README_COMMANDS = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))


def test_every_readme_command_is_in_the_table() -> None:
    listed = [command for _, command in README_COMMANDS]
    missing = [c for c in listed if c not in COMMANDS]
    stale = [c for c in COMMANDS if c not in listed]
    assert not missing, f"README commands without a row in COMMANDS (add one): {missing}"
    assert not stale, f"COMMANDS rows no longer in the README (remove or update them): {stale}"


def test_not_run_commands_name_existing_files() -> None:
    """Even a command not run here must not point at a file that does not exist."""
    for cwd, command in README_COMMANDS:
        if not isinstance(COMMANDS.get(command), NotRun):
            continue
        for token in command.split():
            if re.fullmatch(r"[\w./-]+\.(py|sh|yaml)", token):
                assert (REPO / cwd / token).is_file(), f"{command}: {token} does not exist"
            if token.startswith("apps/"):
                assert (REPO / cwd / token).is_dir(), f"{command}: {token} does not exist"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch 'repository': copies of bundles/, data_manifests/, experiments/ (outputs land here), ../shared."""
    root = tmp_path_factory.mktemp("readme")
    repo = root / "repo"
    for name in ("bundles", "data_manifests", "experiments"):
        shutil.copytree(REPO / name, repo / name)
    if SHARED.is_dir():
        (root / "shared").symlink_to(SHARED, target_is_directory=True)
    return repo


def _argv(command: str) -> tuple[dict[str, str], list[str]]:
    """Environment assignments and argv; ``qgssl``/``python`` run with this interpreter and this checkout."""
    tokens = command.split(" ")
    env: dict[str, str] = {}
    while "=" in tokens[0] and not tokens[0].startswith("-"):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    if tokens[0] == "qgssl":
        tokens = [sys.executable, "-m", "qgssl_monai.cli", *tokens[1:]]
    elif tokens[0] == "python":
        tokens = [sys.executable, *tokens[1:]]
    return env, tokens


def _run(
    workspace: Path, cwd: str, command: str, case: Run, demo: Path, extra: tuple[str, ...] | None = None
) -> subprocess.CompletedProcess:
    text = command
    for old, new in case.replace.items():
        text = text.replace(old, new.format(demo=demo))
    env_updates, argv = _argv(text)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_updates}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    folder = workspace / cwd
    folder.mkdir(parents=True, exist_ok=True)
    extra = case.extra if extra is None else extra
    return subprocess.run([*argv, *extra], cwd=folder, env=env, capture_output=True, text=True, timeout=900)


def _quality_check_inputs(folder: Path, demo: Path) -> None:
    """frame.png / frame_mask.png and pairs.csv (two demo test pairs) where the quality-check rows run."""
    import json

    test = json.loads(demo.read_text())["test"][:2]
    for k, item in enumerate(test):
        Image.open(demo.parent / item["image"]).save(folder / f"pair{k}.png")
        Image.open(demo.parent / item["label"]).save(folder / f"pair{k}_mask.png")
    shutil.copy(folder / "pair0.png", folder / "frame.png")
    shutil.copy(folder / "pair0_mask.png", folder / "frame_mask.png")
    (folder / "pairs.csv").write_text("image,mask\npair0.png,pair0_mask.png\npair1.png,pair1_mask.png\n")


@pytest.mark.slow
def test_readme_commands_run_as_written(workspace: Path, demo_manifest: Path) -> None:
    """Each ``Run`` row in README order; the quality-check rows use the g the bundle rows trained, found by default
    where ``make demo`` puts it (runs/demo/quality/models/model.pt)."""
    have_data = (SHARED / "data").is_dir()
    ran, skipped = [], []
    for cwd, command in README_COMMANDS:
        case = COMMANDS[command]
        if isinstance(case, NotRun) or (case.realdata and not have_data):
            skipped.append(command)
            continue
        if command.startswith("qgssl quality-check"):
            _quality_check_inputs(workspace / cwd, demo_manifest)
            demo_g = workspace / cwd / "runs" / "demo" / "quality" / "models" / "model.pt"
            demo_g.parent.mkdir(parents=True, exist_ok=True)
            for name in ("model.pt", "model.meta.json"):  # g's weights and its sidecar
                shutil.copy(workspace / "bundles" / "quality_predictor" / "models" / name, demo_g.parent / name)
        if case.killed_run is not None:
            shutil.rmtree(workspace / cwd / "models", ignore_errors=True)
            first = _run(workspace, cwd, command.replace(" --resume true", ""), case, demo_manifest, case.killed_run)
            assert first.returncode == 0, f"`{command}` without --resume:\n{(first.stdout + first.stderr)[-3000:]}"
        start = time.perf_counter()
        result = _run(workspace, cwd, command, case, demo_manifest)
        print(f"{time.perf_counter() - start:6.1f} s  {command}")
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"`{command}` (in {cwd}) exited {result.returncode}:\n{output[-3000:]}"
        assert re.search(case.expect_output, output), f"`{command}`: {case.expect_output!r} not in its output:\n{output[-2000:]}"
        ran.append(command)
    assert len(ran) >= 10 if have_data else len(ran) >= 7, (ran, skipped)
    # the prepare row regenerates the shipped manifest (data_root relative to the repository; compared as the folder
    # it names, since ../shared may be reached through a symbolic link that the written path resolves)
    if have_data:
        shipped = json.loads((REPO / "data_manifests" / "kvasir-seg.json").read_text())
        written = json.loads((workspace / "data_manifests" / "kvasir-seg.json").read_text())
        roots = [(REPO / manifest.pop("data_root")).resolve() for manifest in (shipped, written)]  # "repo" base
        assert roots[0] == roots[1] and written == shipped


@pytest.mark.slow
def test_missing_checkpoint_is_one_line_with_the_command_that_makes_it(workspace: Path, demo_manifest: Path) -> None:
    """The README's evaluation command before any training: one error line naming the path and a working command."""
    command = f"python -m monai.bundle run --config_file configs/evaluate.json --bundle_root . --manifest {KVASIR_MANIFEST}"
    assert command in COMMANDS
    fresh = workspace.parent / "fresh" / "bundles"
    shutil.copytree(REPO / "bundles" / "quality_predictor", fresh / "quality_predictor")
    result = _run(fresh, "quality_predictor", command, COMMANDS[command], demo_manifest)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "Traceback" in line or line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    missing = fresh / "quality_predictor" / "models" / "model.pt"
    assert errors[0].startswith(f"error: checkpoint not found: {missing}; make it with: python -m monai.bundle run")
    # the printed commands run from any folder: their config files and manifest exist
    for token in errors[0].split():
        if token.endswith(".json"):
            assert Path(token).is_file(), token

    # training g before the weak snapshots exist: one line naming the snapshots and train_weak.json
    train = next(c for c in COMMANDS if "configs/train.json --bundle_root . --manifest" in c)
    result = _run(fresh, "quality_predictor", train, COMMANDS[train], demo_manifest)
    errors = [line for line in result.stderr.splitlines() if "Traceback" in line or line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    weak = fresh / "quality_predictor" / "models" / "weak" / "weak_epoch_*.pt"
    assert errors[0].startswith(f"error: checkpoint not found: {weak}; make it with: python -m monai.bundle run")
    assert "configs/train_weak.json" in errors[0]

    # a quality-guided SSL run (the README's QAR command) without g: the same one line, before any training
    qar = next(c for c in COMMANDS if "configs/method/qar.json" in c)
    shutil.copytree(REPO / "bundles" / "ssl_segmentation", fresh / "ssl_segmentation")
    result = _run(fresh, "ssl_segmentation", qar, COMMANDS[qar], demo_manifest)
    errors = [line for line in result.stderr.splitlines() if "Traceback" in line or line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: checkpoint not found: {missing}; make it with: python -m monai.bundle run")
    assert f"--manifest {demo_manifest}" in errors[0]
    assert not (fresh / "ssl_segmentation" / "models").exists()


def _bundle_doc_runs(text: str) -> list[list[str]]:
    """argv of every ``monai.bundle run`` line in a bundle model card (shell variables set in the card expanded)."""
    variables: dict[str, str] = {}
    runs = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        assignment = re.match(r"^([A-Z_]+)=(\S+)", line)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
            continue
        if "monai.bundle run" not in line:
            continue
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        runs.append(shlex.split(line, comments=True))
    return runs


@pytest.mark.parametrize("bundle", ["quality_predictor", "ssl_segmentation"])
def test_bundle_model_card_commands_name_existing_files(bundle: str) -> None:
    """The model cards' commands run from the repository root: every config, metadata and manifest file exists."""
    import ast

    runs = _bundle_doc_runs((REPO / "bundles" / bundle / "docs" / "README.md").read_text(encoding="utf-8"))
    assert runs
    for argv in runs:
        for option in ("--config_file", "--meta_file", "--manifest"):
            if option not in argv:
                continue
            value = argv[argv.index(option) + 1]
            files = ast.literal_eval(value) if value.startswith("[") else [value]
            for name in files:
                assert (REPO / name).is_file(), f"{' '.join(argv)}: {name} does not exist (from the repository root)"
