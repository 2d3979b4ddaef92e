"""Load tests: Locust's statistics judged by thresholds; one real headless Locust run."""

import math
import subprocess
import sys
import textwrap
import urllib.request

import pytest
from deployline.config import LoadProfile, Thresholds
from deployline.load_tests import LoadTestFailed, failure_message, judge, read_aggregate, run_load_test, summary_table
from test_local_environments import SERVICE

HEADER = ("Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
          "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,"
          "99.99%,100%")


def stats(tmp_path, requests=1000, failures=5, rps=120.5, p95=80, p99=150):
    path = tmp_path / "expected_stats.csv"
    path.write_text(f"{HEADER}\nGET,/api/items,{requests},{failures},10,12,1,300,100,{rps},0.1,10,12,14,15,40,"
                    f"{p95},120,{p99},250,300,300\n,Aggregated,{requests},{failures},10,12,1,300,100,{rps},0.1,10,12,"
                    f"14,15,40,{p95},120,{p99},250,300,300\n")
    return path


PROFILE = LoadProfile(users=10, spawn_rate=10, duration_seconds=5,
                      thresholds=Thresholds(p95_ms=100, p99_ms=200, max_error_rate=0.01, min_rps=100))


def test_a_profile_within_every_threshold_passes(tmp_path):
    result = judge("expected", PROFILE, read_aggregate(stats(tmp_path)))
    assert result.passed and result.requests == 1000 and result.error_rate == 0.005
    assert (result.throughput_rps, result.p95_ms, result.p99_ms) == (120.5, 80, 150)
    assert "expected" in summary_table([result]) and "pass" in summary_table([result])


@pytest.mark.parametrize(("numbers", "missed"), [
    ({"p95": 101}, "p95_ms 101.0 (limit <= 100.0): MISSED"),
    ({"p99": 250}, "p99_ms 250.0 (limit <= 200.0): MISSED"),
    ({"failures": 20}, "error_rate 0.02 (limit <= 0.01): MISSED"),
    ({"rps": 99.0}, "throughput_rps 99.0 (limit >= 100.0): MISSED"),
])
def test_each_missed_threshold_fails_with_the_numbers(tmp_path, numbers, missed):
    result = judge("peak", PROFILE, read_aggregate(stats(tmp_path, **numbers)))
    assert not result.passed
    message = failure_message(result)
    assert missed in message and "load profile 'peak'" in message and "req/s" in message


def test_no_completed_request_fails_every_check(tmp_path):
    result = judge("expected", PROFILE, read_aggregate(stats(tmp_path, requests=0, failures=0, rps=0, p95="N/A",
                                                             p99="N/A")))
    assert math.isnan(result.p95_ms) and result.error_rate == 1.0
    assert [c.passed for c in result.checks] == [False, False, False, False]


def test_missing_statistics_are_an_error(tmp_path):
    with pytest.raises(LoadTestFailed, match="Locust wrote no statistics"):
        read_aggregate(tmp_path / "nothing_stats.csv")


def test_a_real_locust_run_against_the_sample_service(tmp_path):
    from deployline.embedded import free_port, wait_until

    port = free_port()
    service = subprocess.Popen([sys.executable, "-m", "sample_service", "--port", str(port), "--quiet"],
                               cwd=SERVICE / "src")
    (tmp_path / "locustfile.py").write_text(textwrap.dedent("""\
        from locust import FastHttpUser, constant, task

        class Reader(FastHttpUser):
            wait_time = constant(0.01)

            @task
            def items(self):
                self.client.get("/api/items")

            @task
            def missing(self):
                with self.client.get("/api/items/999999", catch_response=True) as response:
                    if response.status_code == 404:
                        response.success()
        """))
    try:
        # Up when it answers, however busy the machine (a fixed sleep was not always enough).
        wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200,
                   60, "the sample service")
        # Thresholds any machine meets: this checks that a real Locust run is measured, not its speed.
        profile = LoadProfile(users=3, spawn_rate=3, duration_seconds=2, thresholds=Thresholds(min_rps=1))
        result = run_load_test("expected", profile, "locustfile.py", f"http://127.0.0.1:{port}", tmp_path,
                               tmp_path / "reports")
    finally:
        service.terminate()
        service.wait(10)
    assert result.passed, summary_table([result])
    assert result.requests > 2 and result.failures == 0 and result.throughput_rps > 1
    assert {"expected_stats.csv", "expected.html"} <= set(result.reports)


def test_a_missing_locustfile_is_named(tmp_path):
    with pytest.raises(LoadTestFailed, match="capacity.locustfile: tests/load/nope.py does not exist"):
        run_load_test("expected", PROFILE, "tests/load/nope.py", "http://127.0.0.1:1", tmp_path, tmp_path / "r")
