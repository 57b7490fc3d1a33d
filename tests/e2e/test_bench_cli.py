"""``livemig bench`` end to end, livemig alone on the soft accelerator: one
scenario, one run, real processes; the JSON it writes carries the result.
(Speed is never asserted: only that the bench runs and reports.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(120)
def test_bench_runs_livemig_alone_and_writes_json(tmp_path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "livemig", "bench", "--engines", "livemig", "--accel", "soft",
         "--scenario", "512M-100M-dl300", "--reps", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = list(out.glob("bench-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["engines"] == ["livemig"] and data["mem_prealloc"] is False
    (run,) = data["results"]
    assert run["status"] == "completed" and run["scenario"] == "512M-100M-dl300"
    assert run["transferred"] > 100 << 20          # at least the walked range went over
    assert run["src_peak_rss_kib"] > 0 and run["dst_peak_rss_kib"] > 0
    assert "512M-100M-dl300" in proc.stdout
