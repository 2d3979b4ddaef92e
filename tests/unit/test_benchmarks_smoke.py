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
    results = load("parse_time").measure([2], repeat=1)
    assert [r["pipelines"] for r in results] == [2]
    assert results[0]["dags"] > 2
    assert results[0]["import_and_parse_s"] > 0
