"""Smoke runs of the issue-8 benchmarks (``--quick``): each prints its table with the expected rows and columns,
every measured number is positive and finite, and the JSON file holds the same rows.

These check that the scripts work and report sane values; they time nothing (benchmarks/ does that)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_positive(row: dict, columns: tuple[str, ...]) -> None:
    for column in columns:
        value = row[column]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (row, column)


def table_lines(result: dict) -> list[str]:
    lines = result["table"].splitlines()
    assert result["machine"].startswith("machine: ") and "load average" in result["machine"]
    return lines


def test_bench_amp_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("bench_amp")
    out = tmp_path / "amp.json"
    # the quick preset with two of the four networks keeps the smoke run short; --quick itself runs all four
    result = bench.main(["--quick", "--networks", "unet", "attention_unet", "--json", str(out)])
    rows = result["rows"]
    assert [(r["network"], r["size"], r["mode"]) for r in rows] == [
        ("matmul 512^2", "-", "infer"),
        ("conv3x3 64ch 64px", "-", "infer"),
        ("unet", "small", "train"), ("unet", "small", "infer"),
        ("attention_unet", "small", "train"), ("attention_unet", "small", "infer"),
    ]  # fmt: skip
    for row in rows:
        assert_positive(row, bench.SPEED_COLUMNS)
        assert row["speedup_cpu"] == pytest.approx(row["fp32_cpu_ms"] / row["bf16_cpu_ms"])
    assert rows[2]["params"] == 12_177 and rows[4]["params"] == 124_257  # the small presets' documented sizes
    lines = table_lines(result)
    assert lines[1].split()[:4] == ["network", "size", "params", "mode"] and "speedup" in lines[1]
    assert len(lines) == 2 + len(rows) and lines[-1].split()[:4] == ["attention_unet", "small", "124,257", "infer"]
    printed = capsys.readouterr().out
    assert result["table"] in printed and result["machine"] in printed
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))


def test_bench_amp_accuracy_quick(tmp_path: Path) -> None:
    bench = load_script("bench_amp")
    result = bench.main(["--quick", "--accuracy", "--json", str(tmp_path / "acc.json")])
    (row,) = result["rows"]
    assert row["seed"] == 0
    for precision in ("fp32", "bf16"):
        assert 0.0 <= row[f"{precision}_val_dice"] <= 1.0 and 0.0 < row[f"{precision}_test_dice"] <= 1.0
        assert row[f"{precision}_cpu_s"] > 0
    assert row["diff_test_dice"] == pytest.approx(row["bf16_test_dice"] - row["fp32_test_dice"])
    assert row["diff_val_dice"] == pytest.approx(row["bf16_val_dice"] - row["fp32_val_dice"])
    lines = table_lines(result)
    assert lines[-1].split()[0] == "0" and len(lines[-1].split()) == 1 + len(bench.ACCURACY_COLUMNS)


def test_bench_quality_check_quick(tmp_path: Path) -> None:
    bench = load_script("bench_quality_check")
    result = bench.main(["--quick", "--json", str(tmp_path / "qc.json")])
    rows = result["rows"]
    per_backbone = [
        ("model", "latency b1 median ms"), ("model", "latency b1 p95 ms"), ("model", "images/s b8"),
        ("files", "latency b1 median ms"), ("files", "latency b1 p95 ms"), ("files", "images/s b8"),
        ("startup", "QualityChecker() ms"),
    ]  # fmt: skip
    assert [(r["backbone"], r["path"], r["metric"]) for r in rows] == [
        (backbone, *key) for backbone in bench.DEFAULT_BACKBONES for key in per_backbone
    ]
    for backbone in bench.DEFAULT_BACKBONES:
        own = [r for r in rows if r["backbone"] == backbone]
        for row in own[:-1]:
            assert_positive(row, bench.COLUMNS)
        for path in ("model", "files"):
            median, p95 = (r for r in own if r["path"] == path and "latency" in r["metric"])
            assert p95["fp32_wall"] >= median["fp32_wall"] and p95["bf16_wall"] >= median["bf16_wall"]
        assert_positive(own[-1], ("fp32_wall", "fp32_cpu"))
    lines = table_lines(result)
    assert len(lines) == 3 + len(rows) and lines[2].split()[:3] == ["backbone", "path", "metric"]
    assert lines[-1].split()[:2] == ["efficientnet_lite0", "startup"] and lines[-1].split()[-1] == "-"  # no bf16 start-up


def test_bench_scaling_quick(tmp_path: Path) -> None:
    bench = load_script("bench_scaling")
    result = bench.main(["--quick", "--json", str(tmp_path / "scaling.json")])
    rows = result["rows"]
    expected = [("sup", 32, 1), ("pl-qw", 32, 1), ("pl-qw", 32, 2)]
    assert [(r["method"], r["image_size"], r["multiple"]) for r in rows] == expected
    for row in rows:
        assert_positive(row, tuple(c for c in bench.COLUMNS))
        assert row["peak_rss_mb"] >= row["rss_start_mb"]
        assert row["step_cpu_ms"] == pytest.approx(1000 * row["epoch_cpu_s"] / 2)  # 2 steps per epoch
    # SUP caches only the 8 labeled images; PL-QW adds a pool of 1x and 2x the labeled set
    assert [r["cache_images"] for r in rows] == [8, 16, 24]
    lines = table_lines(result)
    printed = [line.split()[:4] for line in lines[-3:]]
    assert printed == [["sup", "32", "-", "0"], ["pl-qw", "32", "1x", "8"], ["pl-qw", "32", "2x", "16"]]


def test_bench_method_step_cost_quick() -> None:
    bench = load_script("bench_method_step_cost")
    sup_cpu, sup_wall = bench.step_cost("sup", "unet", size=32, batch=2, steps=2)
    qw_cpu, _ = bench.step_cost("mt-qw", "unet", size=32, batch=2, steps=2)
    assert 0 < sup_cpu < 60 and 0 < sup_wall < 60
    assert qw_cpu > sup_cpu  # teacher, unlabeled forward and g cost more than the supervised step alone
    assert set(bench.STUDY_METHODS) >= {"sup", "pl-qw", "qar+qw", "fdpl-qw"}


def test_bench_train_speed_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("bench_train_speed")
    out = tmp_path / "speed.json"
    result = bench.main(["--quick", "--networks", "unet", "--methods", "qar", "--json", str(out)])
    rows = result["rows"]
    assert [(r["network"], r["method"], r["threads"]) for r in rows] == [("unet", "qar", 1)]
    row = rows[0]
    assert_positive(row, ("eager_img_s", "fast_img_s", "speedup", "eager_loss", "fast_loss"))
    assert row["speedup"] == pytest.approx(row["fast_img_s"] / row["eager_img_s"])
    assert row["loss_rel_diff"] <= 0.05  # same batches, same initial weights: the speed path trains alike
    assert row["batched"] is True and row["compile"] in (True, False) and row["amp"] in ("bf16", "none")
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    lines = table_lines(result)
    assert lines[1].split()[:5] == ["network", "method", "thr", "eager", "fast"] and len(lines) == 3
    assert result["table"] in capsys.readouterr().out
