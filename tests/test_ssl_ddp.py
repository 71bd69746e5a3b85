"""The DDP overlay (``multi_gpu_train.json``) trains with 2 CPU processes (gloo) via ``torch.distributed.run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_bundle_utils import latest_checkpoint_name

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

TESTS_DIR = Path(__file__).resolve().parent

# runs in each of the 2 processes: train the MT bundle with the DDP overlay and record what each rank saw
DRIVER = """
import json, sys
from pathlib import Path
import torch
from ignite.engine import Events
sys.path.insert(0, {tests_dir!r})
from ssl_bundle_utils import config_files, make_workflow

manifest, out = Path(sys.argv[1]), Path(sys.argv[2])
workflow = make_workflow(config_files("method/mt", "multi_gpu_train"), manifest, out, epoch_length=2, num_epochs=2)
workflow.initialize()
trainer = workflow.parser.get_parsed_content("train#trainer")
record = {{"seen": []}}
trainer.add_event_handler(
    Events.ITERATION_STARTED,
    lambda e: record["seen"].extend(Path(p).name for p in e.state.batch["image"].meta["filename_or_obj"]),
)
def snapshot(engine):
    student = engine.network.module
    record["checksum"] = [float(p.detach().double().sum()) for p in student.parameters()]
    record["teacher_checksum"] = [float(p.detach().double().sum()) for p in engine.method.teacher.parameters()]
trainer.add_event_handler(Events.EPOCH_COMPLETED, snapshot)
workflow.run()
rank = torch.distributed.get_rank()
record.update(
    rank=rank,
    world_size=torch.distributed.get_world_size(),
    backend=torch.distributed.get_backend(),
    network=type(trainer.network).__name__,
    sampler=type(trainer.data_loader.sampler).__name__,
    unlabeled_sampler=type(trainer.unlabeled_data_loader.sampler).__name__,
    handlers=sorted({{type(h).__name__ for h in workflow.parser.get_parsed_content("train#trainer#train_handlers")}}),
    epochs=trainer.state.epoch,
)
(out / f"rank{{rank}}.json").write_text(json.dumps(record))
workflow.finalize()
"""


def test_ddp_overlay_trains_with_two_gloo_processes(demo_manifest: Path, tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests_dir=str(TESTS_DIR)))
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver)]
    result = subprocess.run(
        [*command, str(demo_manifest), str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, record in enumerate(ranks):
        assert record["rank"] == rank and record["world_size"] == 2 and record["backend"] == "gloo"
        assert record["network"] == "DistributedDataParallel"
        assert record["sampler"] == "DistributedSampler" and record["unlabeled_sampler"] == "DistributedSampler"
        assert record["epochs"] == 2
    # rank-0-only handlers: checkpoints, console stats, progress bar, final test evaluation
    assert {"CheckpointSaver", "StatsHandler", "ProgressBar", "RunOnCompleted"} <= set(ranks[0]["handlers"])
    assert not {"CheckpointSaver", "StatsHandler", "ProgressBar", "RunOnCompleted"} & set(ranks[1]["handlers"])
    # the two ranks train on disjoint shards of the labeled data ...
    assert set(ranks[0]["seen"]).isdisjoint(ranks[1]["seen"])
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 2 * 2 * 2  # epochs * epoch_length * batch_size
    # ... yet hold identical weights (gradients all-reduced) and identical EMA teachers
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["teacher_checksum"] == ranks[1]["teacher_checksum"]
    # checkpoints written once, by rank 0, with the unwrapped student (no "module." prefix)
    assert latest_checkpoint_name(out / "models") == "checkpoint_epoch=2.pt"
    best = torch.load(out / "models" / "model.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in best)
