"""A ``livemig bench`` JSON file as the Markdown table BENCHMARKS.md uses.

    python bench/report.py bench/results/bench-YYYYMMDD-HHMMSS.json
"""

import json
import sys

METRICS = {"throughput_mb_s": ("throughput MB/s", 1), "mbps": ("mbps", 1),
           "downtime_ms": ("downtime ms", 1),
           "total_ms": ("total time ms", 1), "src_peak_rss_kib": ("peak RSS src MiB", 1 / 1024),
           "dst_peak_rss_kib": ("peak RSS dst MiB", 1 / 1024)}


def cell(v: dict | None, scale: float) -> str:
    if v is None:
        return "-"
    return f"{v['median'] * scale:.0f} [{v['min'] * scale:.0f}..{v['max'] * scale:.0f}]"


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    runs = {}
    for r in data["results"]:
        runs.setdefault((r["scenario"], r["engine"]), []).append(r["status"])
    print("| scenario | metric | QEMU | livemig | ratio |")
    print("|---|---|---|---|---|")
    for row in data["summary"]:
        s = row["scenario"]
        n = {e: sum(st == "completed" for st in runs.get((s, e), [])) for e in ("qemu", "livemig")}
        label = f"{s} ({n['qemu']}+{n['livemig']} runs)"
        for metric, (name, scale) in METRICS.items():
            ratio = row.get(f"ratio.{metric}")
            print(f"| {label} | {name} | {cell(row.get(f'qemu.{metric}'), scale)} | "
                  f"{cell(row.get(f'livemig.{metric}'), scale)} | "
                  f"{'-' if ratio is None else f'{ratio:.2f}'} |")
            label = ""


if __name__ == "__main__":
    main(sys.argv[1])
