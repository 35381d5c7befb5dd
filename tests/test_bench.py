"""The GPU benchmark scripts run end to end on CPU with the tiny model (`--smoke`), so they cannot rot
between GPU runs. Their figures here mean nothing; the shape of the report does."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, out: Path, name: str = "") -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--smoke", "--out", str(out), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / (name or script.replace(".py", ".json"))).read_text())
    printed = "\n" + done.stdout
    assert json.loads(printed[printed.rindex("\n{\n") + 1 :]) == report  # the JSON table is printed last
    return report


def test_training_comparison_runs(tmp_path):
    """Two systems, each in its own process (the chunked loss against the whole block is tests/test_loss.py's)."""
    report = run_bench(
        "train_compare.py",
        *("--systems", "seed-style,ours", "--blocks", "256", "--repeats", "1", "--steps", "2"),
        *("--work", str(tmp_path / "work")),
        out=tmp_path,
    )
    systems = [row["system"] for row in report["rows"]]
    assert systems == ["seed-style", "ours"]
    for row in report["rows"]:
        assert row["block"] == 256 and row["oom"] is False and row["tokens_per_s"] > 0 and row["measured_steps"] == 2
    ours = [row for row in report["rows"] if row["system"] == "ours"]
    assert all(isinstance(row["levers"], list) for row in ours)  # which levers the row ran with
    cell = report["summary"]["ours"]["256"]
    assert cell["runs"] == 1 and cell["tokens_per_s_min"] <= cell["tokens_per_s_median"] <= cell["tokens_per_s_max"]
    assert cell["ratio_of_medians_vs_seed-style"] > 0
    assert report["longest_block_under_cap"]["ours"] == 256
