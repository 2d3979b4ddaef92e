"""The benchmark code works (a quick run); timings are for `make bench`, never asserted here."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
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


def test_polling_benchmark_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    result = load("polling").measure_pokes(2, tmp_path)
    assert result["poke"]["calls"] == 2 and result["poke"]["median_s"] > 0
    # git's trace names the processes one poke started: the ref listing and its remote side.
    assert result["poke"]["git_processes_per_call"] == {"ls-remote": 1, "upload-pack": 1}


def test_orchestration_report_and_tuning_switch():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    stack = load("benchstack")
    env = {"AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2", "AIRFLOW__CORE__PARALLELISM": "16",
           "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10", "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    assert stack.tuned_env(env, airflow_defaults=True) == {"AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    tuned = stack.tuned_env(env, overrides={"AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
                                            "AIRFLOW__CORE__PARALLELISM": ""})
    assert tuned["AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME"] == "0.2" and "AIRFLOW__CORE__PARALLELISM" not in tuned

    from test_orchestration_analysis import RUN, TASKS, TIS

    sample = load("orchestration_analysis").analyse_run(RUN, TASKS, TIS, target="s2.deploy") | {
        "push_to_production_s": 30.0, "push_to_run_created_s": 5.0, "run_created_to_start_s": 0.5,
        "approvals": {"exploratory": {"marked_to_resumed_s": 2.0}, "production": {"marked_to_resumed_s": None}}}
    report = load("orchestration").report([sample, sample])
    assert report["releases"] == 2 and report["push_to_production_s"]["median"] == 30.0
    assert report["stages"]["s2"]["waiting_s"]["median"] == 9 and report["stages"]["s2"]["dominated_by"] == ["waiting"]
    assert report["approval_marked_to_resumed_s"]["n"] == 2


def test_make_bench_keeps_going_past_a_failed_benchmark_and_keeps_every_result(tmp_path, monkeypatch):
    """A benchmark whose last line is not JSON (the AMI benchmark once printed indented JSON and
    stopped `make bench` after 8 minutes, losing the results before it) is recorded as failed;
    the others run and every result is written."""
    scripts = {"pretty": "import json; print(json.dumps({'a': 1}, indent=2))",
               "crash": "import sys; sys.exit('broken')",
               "fine": "print('log line'); print('{\"b\": 2}')"}
    for name, code in scripts.items():
        (tmp_path / f"{name}.py").write_text(code)
    run = load("run")
    monkeypatch.setattr(run, "HERE", tmp_path)
    monkeypatch.setattr(run, "OUT", tmp_path / "results" / "latest.json")
    monkeypatch.setattr(run, "BENCHMARKS", {name: [f"{name}.py"] for name in scripts})
    assert run.main([]) == 1
    import json

    results = json.loads(run.OUT.read_text())
    assert "not its JSON result" in results["pretty"]["failed"]
    assert results["crash"]["failed"] == "exit code 1" and "broken" in results["crash"]["stderr"]
    assert results["fine"] == {"b": 2}
    # run again for one name: its entry is replaced, the others kept
    (tmp_path / "pretty.py").write_text("print('{\"a\": 1}')")
    assert run.main(["pretty"]) == 0
    assert json.loads(run.OUT.read_text()) == {"pretty": {"a": 1}, "crash": results["crash"], "fine": {"b": 2}}
    assert run.main(["nope"]) == 2


def test_the_burst_benchmark_writes_valid_pipelines_with_repositories_of_their_own(tmp_path):
    from deployline.config import load_pipeline_config

    burst = load("burst")
    folder, repos = burst.write_pipelines(tmp_path, 3)
    configs = [load_pipeline_config(path) for path in sorted(folder.glob("*.yaml"))]
    assert [c.application for c in configs] == ["burst_01", "burst_02", "burst_03"]
    assert {c.repository.url for c in configs} == {str(bare) for bare, _ in repos.values()}
    shas = burst.push_all_at_once(repos)
    for app, (bare, _) in repos.items():  # each pushed commit is the head of its own repository
        from deployline import embedded

        assert embedded.git("rev-parse", "refs/heads/main", cwd=bare) == shas[app]
