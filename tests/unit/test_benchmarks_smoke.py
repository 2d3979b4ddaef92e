"""The benchmark code works (a quick run); timings are for `make bench`, never asserted here."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_benchmark_runs():
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "parse_time.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])  # the JSON is the last line
    [parsed] = result["parse"]
    assert parsed["pipelines"] == 2 and parsed["dags"] > 2
    for clock in ("wall", "cpu"):
        assert set(parsed[clock]["per_file_parse_s"]) == {p.name for p in (ROOT / "dags").glob("*.py")}
        assert parsed[clock]["files_parse_total_s"] > 0 and parsed[clock]["bare_import_s"] > 0


def test_parse_benchmark_reads_the_cli_durations():
    assert load("parse_time").duration_seconds("0:01:02.500000") == 62.5


def test_capacity_and_switch_benchmark_runs():
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "capacity_and_switch.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])  # the JSON is the last line
    assert result["capacity_size_2"]["expected"]["requests"] > 0
    assert result["locust_ceiling"]["requests"] > 0
    assert result["blue_green"]["switches"] == 1 and result["blue_green"]["requests"] > 0
