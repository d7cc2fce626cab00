"""`jvlm bench` end to end on the tiny checkpoint: every phase runs in its own process and the report holds
what the full-size run reports (the figures themselves mean nothing at this size)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"

FAST = ["--repeats", "1", "--repeats-ttft", "1", "--repeats-reference", "1", "--decode-tokens", "4",
        "--decode-tokens-reference", "3", "--wait-idle", "0"]


def bench(tiny_dir, tmp_path, *extra):
    report, raw = tmp_path / "report.md", tmp_path / "raw.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--checkpoint", str(tiny_dir), *FAST, *extra,
                           "--output", str(report), "--json", str(raw)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return report.read_text(), json.loads(raw.read_text())


def test_bench_measures_every_format_and_the_reference(tiny_dir, tmp_path):
    report, raw = bench(tiny_dir, tmp_path, "--time-budget", "0")
    phases = ["machine", "jvlm:int8", "jvlm:bfloat16", "jvlm:float32", "reference:bfloat16", "reference:float32"]
    assert list(raw["results"]) == phases  # report order, although the reference runs before the later formats
    assert not [p for p, r in raw["results"].items() if "error" in r or "skipped" in r]
    for row in ("| jvlm int8 |", "| jvlm bfloat16 |", "| jvlm float32 |", "| reference bfloat16 |",
                "| reference float32 |", "| int8 |"):
        assert row in report
    assert "- command: `python benchmarks/bench.py --checkpoint" in report and "- machine: " in report
    targets = report[report.index("## Targets"):]
    assert targets.count("- met: ") + targets.count("- **missed**: ") == 9
    jvlm = raw["results"]["jvlm:int8"]
    assert jvlm["prompt_tokens"] > jvlm["crops"] > 1 and jvlm["follow_up_cached_tokens"] > 0


def test_bench_drops_later_formats_past_its_time_budget(tiny_dir, tmp_path):
    report, raw = bench(tiny_dir, tmp_path, "--formats", "int8,bfloat16", "--reference", "none",
                        "--time-budget", "0.01")
    assert list(raw["results"]) == ["machine", "jvlm:int8", "jvlm:bfloat16"]
    assert "prompt_tokens" in raw["results"]["jvlm:int8"]  # the first format always runs
    assert "--time-budget 0 s" in raw["results"]["jvlm:bfloat16"]["skipped"]
    assert "| jvlm int8 |" in report and "| jvlm bfloat16 |" not in report
    assert "- jvlm:bfloat16 not measured: it would have ended the run past --time-budget" in report
