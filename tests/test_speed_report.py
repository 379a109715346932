"""benchmarks/speed.py's report: every round's time, and every round's paired ratio with its median."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def load_speed():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    spec = importlib.util.spec_from_file_location("speed_benchmark", path)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    return speed


def table(out: str, title: str) -> list[list[str]]:
    """The rows (cells) of the markdown table after the line starting with `title`, its head left out."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows = []
    for line in lines[start + 1 :]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[1:]


def test_the_report_gives_each_rounds_paired_ratios_and_their_median(capsys):
    """Three rounds in which the machine's speed drifts by 2x: each round's ratio pairs the kinds
    measured in that round, and the medians are of those ratios, not ratios of the kinds' median
    times (here those would be 1.80 and 1.67)."""
    speed = load_speed()
    drift = [1.0, 2.0, 1.5]
    results = {
        ("bound", 0): [{"seconds": 1.0 * d, "mkl_seconds": 1.6 * d} for d in drift],
        ("vaelab-fp32", 0): [{"seconds": t, "test_loss": 165.0, "peak_mib": 400} for t in (2.0, 4.4, 2.7)],
        ("keras-jax", 0): [{"seconds": 3.0 * d, "test_loss": 166.0, "peak_mib": 600} for d in drift],
    }
    speed.report(results, ["bound", "vaelab-fp32", "keras-jax"], [0])
    out = capsys.readouterr().out
    times = {row[0]: row for row in table(out, "quiet: seconds per epoch")}
    assert times["vaelab-fp32"][1:4] == ["2.000", "4.400", "2.700"]  # every round as measured
    assert times["vaelab-fp32"][5] == "2.00"  # x bound: the median of the paired ratios
    assert times["vaelab-fp32"][7] == "1.50 vs keras-jax"
    ratios = {(row[0], row[1]): row[2:] for row in table(out, "quiet: the paired ratios")}
    assert ratios[("vaelab-fp32", "x bound")] == ["2.00", "2.20", "1.80", "2.00"]
    assert ratios[("vaelab-fp32", "vs keras-jax")] == ["1.50", "1.36", "1.67", "1.50"]
    assert {kind for kind, _ in ratios} == {"vaelab-fp32"}  # bounds and peers get no row of their own
