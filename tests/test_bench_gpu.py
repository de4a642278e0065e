"""bench/gpu.py's pipeline on the CPU (--quick): tables, plans at both resources, timings, the search step, the report."""
import json
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu  # noqa: E402


def test_gpu_bench_quick_mode_writes_its_results_and_a_section(tmp_path):
    (tmp_path / "BENCHMARKS.md").write_text("# kept\n")
    assert gpu.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu.json").read_text())
    record = results["models"][0]
    assert results["device"].startswith("cpu") and record["tables"]["4"]["key"]["batch"] == 4
    timed = [t for t in record["timings"] if "speedup" in t]
    assert {t["resource"] for t in record["timings"]} == {"macs", "latency"} and timed
    for t in timed:
        assert t["dense"] > 0 and t["slimmed"] > 0 and 0 < t["latency_ratio_measured"]
        if t["resource"] == "macs":
            assert t["budget"] - 0.01 <= t["macs_ratio"] <= t["budget"]
        else:
            assert t["budget"] - 0.01 <= t["latency_ratio_predicted"] <= t["budget"]
    step = results["search_step"][0]
    assert step["search_s"] > 0 and step["plain_s"] > 0
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert text.startswith("# kept\n") and text.count(gpu.BEGIN) == 1 and results["device"] in text
    gpu.write(results, tmp_path, tmp_path / "BENCHMARKS.md")  # a rerun replaces its section, nothing else
    assert (tmp_path / "BENCHMARKS.md").read_text() == text
