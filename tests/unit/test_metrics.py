"""Delivery metrics (deployline.metrics) on small hand-made release registries.

Every expected figure is worked out by hand in the comments and written as a literal.
Times are UTC; "03-02 05:00" in a comment means 2024-03-02T05:00:00Z.
"""

from datetime import UTC, datetime, timedelta, timezone

import pytest
from deployline import metrics
from deployline.metrics import Window, parse_time

# ------------------------------------------------------------------------------- helpers


def sha(tag: str) -> str:
    """A 40-character sha made of a short hex tag: sha("c3") == "c3c3...c3"."""
    return (tag * 40)[:40]


def version(revision: int, tag: str) -> str:
    return f"r{revision}-{sha(tag)[:10]}"


def commit(tag: str, committed_at: str | None, reverts: tuple[str, ...] = ()) -> dict:
    return {"sha": sha(tag), "committed_at": committed_at, "message": f"change {tag}", "author": "dev",
            "reverts": list(reverts)}


def release(revision: int, tag: str, committed_at: str | None = None, *, earlier: tuple[dict, ...] = (),
            reverts: tuple[str, ...] = (), deployments: tuple[dict, ...] = (), stages: dict | None = None) -> dict:
    """A release record; ``earlier`` are the older commits it includes besides its own (newest first)."""
    own = commit(tag, committed_at, reverts)
    return {"version": version(revision, tag), "application": "shop", "commit": own,
            "included_commits": [own, *earlier], "deployments": list(deployments), "stages": stages or {}}


def deployed(at: str, previous: str | None = None) -> dict:
    return {"result": "deployed", "started_at": at, "at": at, "run_id": f"run {at}", "previous_version": previous}


def rolled_back(at: str) -> dict:
    return {"result": "rolled_back", "started_at": at, "at": at, "run_id": f"run {at}", "phase": "smoke_test",
            "restored_version": None}


def window(start: str, end: str) -> Window:
    return Window(datetime.fromisoformat(start).replace(tzinfo=UTC), datetime.fromisoformat(end).replace(tzinfo=UTC))


def stage(result: str, started_at: str | None, finished_at: str | None) -> dict:
    entry = {"result": result, "run_id": "run"}
    if started_at:
        entry["started_at"] = started_at
    if finished_at:
        entry["finished_at"] = finished_at
    return entry


# ------------------------------------------------------------------------------- registries


def lead_time_registry() -> list[dict]:
    """r2 never reaches production: its two commits go live with r3."""
    return [
        # a1 committed 03-01 00:00, live 03-01 10:00 -> 10 h
        release(1, "a1", "2024-03-01T00:00:00Z", deployments=(deployed("2024-03-01T10:00:00Z"),)),
        # b2 (03-02 00:00) and b1 (03-01 20:00): built, never deployed
        release(2, "b2", "2024-03-02T00:00:00Z", earlier=(commit("b1", "2024-03-01T20:00:00Z"),)),
        # r3 live 03-03 06:00 (previous r1) ships b2 -> 30 h, b1 -> 34 h, c3 (03-03 00:00) -> 6 h
        release(3, "c3", "2024-03-03T00:00:00Z",
                deployments=(deployed("2024-03-03T06:00:00Z", previous=version(1, "a1")),)),
        # d4 committed 03-04 00:00, live 03-04 02:00 -> 2 h
        release(4, "d4", "2024-03-04T00:00:00Z",
                deployments=(deployed("2024-03-04T02:00:00Z", previous=version(3, "c3")),)),
    ]


def incident_registry() -> list[dict]:
    """Two rollbacks (one never restored) and one revert; listed out of order on purpose."""
    records = [
        release(1, "a1", "2024-02-29T20:00:00Z", deployments=(deployed("2024-03-01T00:00:00Z"),)),
        release(2, "b2", "2024-03-01T20:00:00Z", deployments=(rolled_back("2024-03-02T01:00:00Z"),)),
        release(3, "c3", "2024-03-02T03:00:00Z",
                deployments=(deployed("2024-03-02T05:00:00Z", previous=version(1, "a1")),)),
        # d4 reverts c3 (short sha, as `git revert` writes it in the message)
        release(4, "d4", "2024-03-03T01:00:00Z", reverts=(sha("c3")[:7],),
                deployments=(deployed("2024-03-03T05:00:00Z", previous=version(3, "c3")),)),
        release(5, "e5", "2024-03-03T20:00:00Z",
                deployments=(deployed("2024-03-04T00:00:00Z", previous=version(4, "d4")),)),
        release(6, "f6", "2024-03-05T20:00:00Z", deployments=(rolled_back("2024-03-06T00:00:00Z"),)),
    ]
    return records[::-1]


def stage_registry() -> list[dict]:
    return [
        release(1, "a1", stages={
            "classify_change": {"result": "app", "finished_at": "2024-03-01T09:59:00Z"},  # not a stage: ignored
            "2-commit": stage("success", "2024-03-01T10:00:00Z", "2024-03-01T10:05:00Z"),  # 300 s
            "3-acceptance": stage("failed", "2024-03-01T10:05:00Z", "2024-03-01T10:25:00Z"),  # 1200 s
            "5-exploratory": stage("success", "2024-03-01T11:00:00Z", "2024-03-01T15:00:00Z"),  # 14400 s
            "8-production": stage("superseded", "2024-03-01T16:00:00Z", "2024-03-01T16:01:00Z"),  # 60 s
        }),
        release(2, "b2", stages={
            "2-commit": stage("success", "2024-03-02T10:00:00Z", "2024-03-02T10:10:00Z"),  # 600 s
            "3-acceptance": stage("running", "2024-03-02T10:10:00Z", None),  # still running: ignored
            "8-production": stage("success", "2024-03-02T12:00:00Z", "2024-03-02T12:30:00Z"),  # 1800 s
        }),
        release(3, "c3", stages={
            "2-commit": stage("failed", "2024-03-02T11:00:00Z", "2024-03-02T11:01:30Z"),  # 90 s
            "8-production": stage("failed", "2024-03-02T13:00:00Z", "2024-03-02T13:20:00Z"),  # 1200 s
        }),
        release(4, "d4", stages={
            "2-commit": stage("success", "2024-03-09T10:00:00Z", "2024-03-09T10:01:00Z"),  # after the window
            "6-capacity": stage("success", "2024-03-07T23:00:00Z", "2024-03-08T00:00:00Z"),  # at the end: out
        }),
        release(5, "e5", stages={
            "2-commit": stage("success", None, "2024-03-03T00:00:00Z"),  # passed, no duration
            "6-capacity": stage("success", "2024-02-29T23:00:00Z", "2024-03-01T01:00:00Z"),  # 7200 s, counted
        }),
    ]


# ------------------------------------------------------------------------------- time, window, statistics


def test_parse_time_z_offsets_naive_and_empty():
    assert parse_time("2024-03-01T10:00:00Z") == datetime(2024, 3, 1, 10, tzinfo=UTC)
    assert parse_time("2024-03-01T10:00:00") == datetime(2024, 3, 1, 10, tzinfo=UTC)  # naive: taken as UTC
    assert parse_time("2024-03-01T10:00:00+02:00") == datetime(2024, 3, 1, 8, tzinfo=UTC)
    assert parse_time("2024-03-01T10:00:00.250000+00:00") == datetime(2024, 3, 1, 10, 0, 0, 250000, tzinfo=UTC)
    assert parse_time("2024-03-01T10:00:00Z").tzinfo is UTC
    assert parse_time("2024-03-01T10:00:00+02:00").isoformat() == "2024-03-01T08:00:00+00:00"
    assert parse_time(None) is None
    assert parse_time("") is None


def test_window_end_must_be_after_start():
    with pytest.raises(ValueError) as raised:
        window("2024-03-08", "2024-03-01")
    assert "2024-03-01T00:00:00+00:00" in str(raised.value)
    assert "2024-03-08T00:00:00+00:00" in str(raised.value)
    assert str(raised.value) == ("window end 2024-03-01T00:00:00+00:00 is not after its start "
                                 "2024-03-08T00:00:00+00:00")
    with pytest.raises(ValueError, match="is not after its start"):
        window("2024-03-01", "2024-03-01")  # empty


def test_window_is_half_open_and_reports_its_days():
    week = Window.last(7, end=datetime(2024, 3, 8, tzinfo=UTC))
    assert week.start == datetime(2024, 3, 1, tzinfo=UTC)
    assert week.days == 7.0
    assert week.to_dict() == {"start": "2024-03-01T00:00:00+00:00", "end": "2024-03-08T00:00:00+00:00", "days": 7.0}
    assert datetime(2024, 3, 1, tzinfo=UTC) in week  # start included
    assert datetime(2024, 3, 7, 23, 59, 59, tzinfo=UTC) in week
    assert datetime(2024, 3, 8, tzinfo=UTC) not in week  # end excluded
    assert datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC) not in week
    assert None not in week
    assert window("2024-03-01T00:00", "2024-03-01T08:00").to_dict()["days"] == 0.333
    before, last_day, after = datetime.now(UTC), Window.last(1), datetime.now(UTC)
    assert before <= last_day.end <= after and last_day.end - last_day.start == timedelta(days=1)


def test_median_and_p90_nearest_rank():
    assert metrics.median([]) is None and metrics.p90([]) is None
    assert metrics.median([7]) == 7 and metrics.p90([7]) == 7
    assert metrics.median([4, 1, 3, 2]) == 2.5  # even count: mean of the two middle values
    assert metrics.median([5, 1, 3]) == 3
    assert metrics.p90([10, 9, 8, 7, 6, 5, 4, 3, 2, 1]) == 9  # rank ceil(0.9 * 10) = 9
    assert metrics.p90(list(range(1, 12))) == 10  # 11 values: rank ceil(9.9) = 10
    assert metrics.p90(list(range(1, 20))) == 18  # 19 values: rank ceil(17.1) = 18
    assert metrics.p90(list(range(1, 21))) == 18  # 20 values: rank 18
    assert metrics.p90([1, 100]) == 100  # 2 values: rank ceil(1.8) = 2
    assert metrics.summary([3, 1, 2]) == {"count": 3, "median": 2, "p90": 3}
    assert metrics.summary([]) == {"count": 0, "median": None, "p90": None}


# ------------------------------------------------------------------------------- deploys


def test_deploys_are_every_production_attempt_oldest_first():
    record = release(1, "a1", deployments=(
        deployed("2024-03-02T00:00:00Z"),
        rolled_back("2024-03-01T00:00:00Z"),
        {"result": "deployed", "started_at": "2024-03-03T00:00:00Z"},  # no `at`: unusable
        {"result": "superseded", "at": "2024-03-04T00:00:00Z"},  # not a production attempt
    ))
    record["deployments"][0]["previous_version"] = "r0-0000000"
    found = metrics.deploys([record, release(2, "b2")])
    assert [(d.version, d.result, d.at.isoformat(), d.previous_version) for d in found] == [
        ("r1-a1a1a1a1a1", "rolled_back", "2024-03-01T00:00:00+00:00", None),
        ("r1-a1a1a1a1a1", "deployed", "2024-03-02T00:00:00+00:00", "r0-0000000"),
    ]
    assert found[0].revision == 1 and found[0].run_id == "run 2024-03-01T00:00:00Z"


# ------------------------------------------------------------------------------- deployment frequency


def test_deployment_frequency_counts_successful_deploys_per_day_and_week():
    records = [
        release(1, "a1", deployments=(deployed("2024-03-07T23:59:00Z"),)),  # before the 7-day window
        release(2, "b2", deployments=(deployed("2024-03-08T00:00:00Z"),)),  # at its start: in
        release(3, "c3", deployments=(rolled_back("2024-03-09T00:00:00Z"),)),  # a failed attempt: not a deploy
        release(4, "d4", deployments=(deployed("2024-03-10T12:00:00Z"),)),
        release(5, "e5", deployments=(deployed("2024-03-14T23:59:00Z"),)),
        release(6, "f6", deployments=(deployed("2024-03-15T00:00:00Z"),)),  # at its end: out
    ]
    week = metrics.deployment_frequency(records, window("2024-03-08", "2024-03-15"))
    assert week["deploys"] == 3
    assert week["per_day"] == pytest.approx(0.428571, abs=1e-6)  # 3 / 7
    assert week["per_week"] == pytest.approx(3.0)
    month = metrics.deployment_frequency(records, window("2024-02-15", "2024-03-16"))  # 30 days
    assert month["deploys"] == 5
    assert month["per_day"] == pytest.approx(0.166667, abs=1e-6)  # 5 / 30
    assert month["per_week"] == pytest.approx(1.166667, abs=1e-6)  # 5 / 30 * 7
    assert metrics.deployment_frequency(records, window("2024-04-01", "2024-04-08")) == {
        "deploys": 0, "per_day": 0.0, "per_week": 0.0}


def test_deployment_frequency_counts_each_attempt_of_a_redeployed_version():
    records = [release(1, "a1", deployments=(deployed("2024-03-01T00:00:00Z"), deployed("2024-03-02T00:00:00Z")))]
    assert metrics.deployment_frequency(records, window("2024-03-01", "2024-03-03"))["deploys"] == 2


# ------------------------------------------------------------------------------- lead time


def test_lead_time_per_commit_including_commits_of_a_release_never_deployed():
    records = lead_time_registry()
    # all four deploys: [10, 34, 30, 6, 2] -> sorted [2, 6, 10, 30, 34]; p90 rank ceil(4.5) = 5
    assert metrics.lead_time(records, window("2024-03-01", "2024-03-08")) == {
        "count": 5, "median": 10.0, "p90": 34.0, "unit": "hours"}
    # r3 and r4 only: [34, 30, 6, 2] -> median (6 + 30) / 2; p90 rank ceil(3.6) = 4
    assert metrics.lead_time(records, window("2024-03-02", "2024-03-08")) == {
        "count": 4, "median": 18.0, "p90": 34.0, "unit": "hours"}
    assert metrics.lead_time(records, window("2024-03-01", "2024-03-02")) == {
        "count": 1, "median": 10.0, "p90": 10.0, "unit": "hours"}
    assert metrics.lead_time(records, window("2024-03-05", "2024-03-08")) == {
        "count": 0, "median": None, "p90": None, "unit": "hours"}


def test_shipped_commits_are_those_first_put_live_by_each_deploy():
    records = lead_time_registry()
    successful = [d for d in metrics.deploys(records) if d.result == "deployed"]
    shipped = metrics.shipped_commits(records, successful)
    assert {index: [c["sha"][:2] for c in commits] for index, commits in shipped.items()} == {
        0: ["a1"], 1: ["b2", "b1", "c3"], 2: ["d4"]}


def test_lead_time_p90_over_many_commits_of_one_deploy():
    # ten commits committed 1 h, 2 h, ... 10 h before the deploy at 03-02 00:00
    commits = tuple(commit(f"0{n}" if n < 10 else "10", f"2024-03-01T{24 - n:02d}:00:00Z") for n in range(2, 11))
    records = [release(1, "01", "2024-03-01T23:00:00Z", earlier=commits,
                       deployments=(deployed("2024-03-02T00:00:00Z"),))]
    assert metrics.lead_time(records, window("2024-03-01", "2024-03-08")) == {
        "count": 10, "median": 5.5, "p90": 9.0, "unit": "hours"}
    # an eleventh commit, 11 h before: rank ceil(9.9) = 10 -> 10 h; median the 6th value
    records[0]["included_commits"].append(commit("11", "2024-03-01T13:00:00Z"))
    assert metrics.lead_time(records, window("2024-03-01", "2024-03-08")) == {
        "count": 11, "median": 6.0, "p90": 10.0, "unit": "hours"}


def test_lead_time_counts_only_releases_after_the_previous_live_version():
    def registry(previous):
        return [
            release(1, "a1", "2024-03-01T00:00:00Z"),  # live before the registry recorded deploys
            release(2, "b2", "2024-03-02T00:00:00Z"),
            release(3, "c3", "2024-03-03T00:00:00Z", deployments=(deployed("2024-03-03T12:00:00Z", previous),)),
        ]

    week = window("2024-03-01", "2024-03-08")
    # previous r2: only r3's commit c3 went live with this deploy -> 12 h
    assert metrics.lead_time(registry(version(2, "b2")), week) == {
        "count": 1, "median": 12.0, "p90": 12.0, "unit": "hours"}
    # no previous version (a first deploy): everything up to r3 -> [60, 36, 12]
    assert metrics.lead_time(registry(None), week) == {"count": 3, "median": 36.0, "p90": 60.0, "unit": "hours"}


def test_lead_time_of_commits_of_a_rolled_back_release_runs_to_the_next_successful_deploy():
    records = [
        release(1, "a1", "2024-03-01T00:00:00Z", deployments=(deployed("2024-03-01T01:00:00Z"),)),  # 1 h
        release(2, "b2", "2024-03-02T00:00:00Z", deployments=(rolled_back("2024-03-02T02:00:00Z"),)),
        # r3 (previous r1) puts b2 live: 03-02 00:00 -> 03-03 04:00 = 28 h; c3 4 h
        release(3, "c3", "2024-03-03T00:00:00Z",
                deployments=(deployed("2024-03-03T04:00:00Z", version(1, "a1")),)),
    ]
    assert metrics.lead_time(records, window("2024-03-01", "2024-03-08")) == {
        "count": 3, "median": 4.0, "p90": 28.0, "unit": "hours"}
    assert metrics.lead_time(records, window("2024-03-02", "2024-03-03"))["count"] == 0  # a rollback ships nothing


def test_a_commit_already_live_is_not_counted_again():
    a1 = commit("a1", "2024-03-01T00:00:00Z")
    records = [
        release(1, "a1", "2024-03-01T00:00:00Z", deployments=(deployed("2024-03-01T02:00:00Z"),)),  # 2 h
        # r2 lists a1 again (its base was not an ancestor); a1 is already live
        release(2, "b2", "2024-03-02T00:00:00Z", earlier=(a1,),
                deployments=(deployed("2024-03-02T05:00:00Z", version(1, "a1")),)),  # b2: 5 h
        # r3 deployed without a previous version: everything up to r3, minus what is live
        release(3, "c3", "2024-03-03T00:00:00Z", deployments=(deployed("2024-03-03T03:00:00Z"),)),  # c3: 3 h
    ]
    assert metrics.lead_time(records, window("2024-03-01", "2024-03-08")) == {
        "count": 3, "median": 3.0, "p90": 5.0, "unit": "hours"}


def test_lead_time_falls_back_to_the_record_commit_and_skips_commits_without_a_time():
    with_commit_only = release(1, "a1", "2024-03-01T00:00:00Z", deployments=(deployed("2024-03-01T06:00:00Z"),))
    del with_commit_only["included_commits"]
    undated = release(2, "b2", None, deployments=(deployed("2024-03-02T00:00:00Z", version(1, "a1")),))
    assert metrics.lead_time([with_commit_only, undated], window("2024-03-01", "2024-03-08")) == {
        "count": 1, "median": 6.0, "p90": 6.0, "unit": "hours"}


# ------------------------------------------------------------------------------- incidents, failure rate, restore


def test_incidents_of_the_incident_registry():
    found = metrics.incidents(incident_registry())
    assert [i.to_dict(datetime(2024, 3, 8, tzinfo=UTC)) for i in found] == [
        {"version": "r2-b2b2b2b2b2", "kind": "rolled_back", "failed_at": "2024-03-02T01:00:00+00:00",
         "restored_at": "2024-03-02T05:00:00+00:00", "restored_by": "r3-c3c3c3c3c3", "hours": 4.0},
        {"version": "r3-c3c3c3c3c3", "kind": "reverted", "failed_at": "2024-03-02T05:00:00+00:00",
         "restored_at": "2024-03-03T05:00:00+00:00", "restored_by": "r4-d4d4d4d4d4", "hours": 24.0},
        {"version": "r6-f6f6f6f6f6", "kind": "rolled_back", "failed_at": "2024-03-06T00:00:00+00:00",
         "restored_at": None, "restored_by": None, "hours": 48.0},
    ]


def test_change_failure_rate_rolled_back_and_reverted():
    records = incident_registry()
    # attempts r1, r2 (rolled back), r3 (reverted by d4), r4, r5: 2 of 5 failed
    assert metrics.change_failure_rate(records, window("2024-03-01", "2024-03-05")) == {
        "deploys": 5, "failed": 2, "rate": 0.4}
    assert metrics.change_failure_rate(records, window("2024-03-01", "2024-03-08")) == {
        "deploys": 6, "failed": 3, "rate": 0.5}
    assert metrics.change_failure_rate(records, window("2024-03-03", "2024-03-05")) == {
        "deploys": 2, "failed": 0, "rate": 0.0}
    assert metrics.change_failure_rate(records, window("2024-03-05", "2024-03-08")) == {
        "deploys": 1, "failed": 1, "rate": 1.0}
    assert metrics.change_failure_rate(records, window("2024-03-10", "2024-03-11")) == {
        "deploys": 0, "failed": 0, "rate": None}


def test_a_revert_shipped_with_the_commit_it_reverts_is_no_failure():
    records = [
        release(1, "a1", "2024-03-01T00:00:00Z", deployments=(deployed("2024-03-01T00:00:00Z"),)),
        release(2, "b2", "2024-03-01T12:00:00Z", deployments=(rolled_back("2024-03-02T00:00:00Z"),)),
        # c3 reverts b2; r3 puts b2 and c3 live together
        release(3, "c3", "2024-03-02T01:00:00Z", reverts=(sha("b2"),),
                deployments=(deployed("2024-03-02T06:00:00Z", version(1, "a1")),)),
    ]
    assert [(i.version, i.kind) for i in metrics.incidents(records)] == [("r2-b2b2b2b2b2", "rolled_back")]
    assert metrics.change_failure_rate(records, window("2024-03-01", "2024-03-08")) == {
        "deploys": 3, "failed": 1, "rate": pytest.approx(0.333333, abs=1e-6)}


def test_a_reverted_commit_is_blamed_on_the_deploy_that_put_it_live():
    records = [
        release(1, "a1", "2024-03-01T00:00:00Z", deployments=(deployed("2024-03-01T00:00:00Z"),)),
        release(2, "b2", "2024-03-02T00:00:00Z"),  # never deployed
        release(3, "c3", "2024-03-02T12:00:00Z",
                deployments=(deployed("2024-03-03T00:00:00Z", version(1, "a1")),)),  # puts b2 live
        release(4, "d4", "2024-03-03T12:00:00Z", reverts=(sha("b2")[:7],),
                deployments=(deployed("2024-03-04T00:00:00Z", version(3, "c3")),)),
    ]
    assert [i.to_dict(datetime(2024, 3, 8, tzinfo=UTC)) for i in metrics.incidents(records)] == [
        {"version": "r3-c3c3c3c3c3", "kind": "reverted", "failed_at": "2024-03-03T00:00:00+00:00",
         "restored_at": "2024-03-04T00:00:00+00:00", "restored_by": "r4-d4d4d4d4d4", "hours": 24.0}]
    assert metrics.change_failure_rate(records, window("2024-03-01", "2024-03-08")) == {
        "deploys": 3, "failed": 1, "rate": pytest.approx(0.333333, abs=1e-6)}


def test_a_deploy_reverted_twice_is_one_failure_restored_by_the_first_revert():
    records = [
        release(1, "a1", "2024-03-01T00:00:00Z", earlier=(commit("a0", "2024-02-29T00:00:00Z"),),
                deployments=(deployed("2024-03-01T00:00:00Z"),)),
        release(2, "b2", "2024-03-01T12:00:00Z", reverts=(sha("a1"),),
                deployments=(deployed("2024-03-02T00:00:00Z", version(1, "a1")),)),
        release(3, "c3", "2024-03-02T12:00:00Z", reverts=(sha("a0"),),
                deployments=(deployed("2024-03-03T00:00:00Z", version(2, "b2")),)),
    ]
    assert [(i.version, i.kind, i.restored_by, i.hours(datetime(2024, 3, 8, tzinfo=UTC)))
            for i in metrics.incidents(records)] == [("r1-a1a1a1a1a1", "reverted", "r2-b2b2b2b2b2", 24.0)]
    assert metrics.change_failure_rate(records, window("2024-03-01", "2024-03-08")) == {
        "deploys": 3, "failed": 1, "rate": pytest.approx(0.333333, abs=1e-6)}


def test_a_revert_restores_when_it_goes_live_even_after_its_own_release_rolled_back():
    records = [
        release(1, "a1", "2024-03-01T00:00:00Z", deployments=(deployed("2024-03-01T00:00:00Z"),)),
        release(2, "b2", "2024-03-01T12:00:00Z", reverts=(sha("a1")[:12],),
                deployments=(rolled_back("2024-03-02T00:00:00Z"),)),
        release(3, "c3", "2024-03-02T01:00:00Z",
                deployments=(deployed("2024-03-02T03:00:00Z", version(1, "a1")),)),  # puts the revert b2 live
    ]
    assert [i.to_dict(datetime(2024, 3, 8, tzinfo=UTC)) for i in metrics.incidents(records)] == [
        {"version": "r1-a1a1a1a1a1", "kind": "reverted", "failed_at": "2024-03-01T00:00:00+00:00",
         "restored_at": "2024-03-02T03:00:00+00:00", "restored_by": "r3-c3c3c3c3c3", "hours": 27.0},
        {"version": "r2-b2b2b2b2b2", "kind": "rolled_back", "failed_at": "2024-03-02T00:00:00+00:00",
         "restored_at": "2024-03-02T03:00:00+00:00", "restored_by": "r3-c3c3c3c3c3", "hours": 3.0},
    ]


def test_a_revert_not_yet_deployed_already_fails_the_deploy():
    records = [
        release(1, "a1", "2024-03-01T00:00:00Z", deployments=(deployed("2024-03-01T00:00:00Z"),)),
        # b2 reverts a1; its release is built and waits (for approval, say): not deployed yet
        release(2, "b2", "2024-03-02T00:00:00Z", reverts=(sha("a1")[:7],)),
    ]
    week = window("2024-03-01", "2024-03-08")
    assert metrics.change_failure_rate(records, week) == {"deploys": 1, "failed": 1, "rate": 1.0}
    # open as of the window end: 03-01 00:00 -> 03-08 00:00
    assert [(i["version"], i["restored_at"], i["hours"]) for i in metrics.time_to_restore(records, week)["open"]] == [
        ("r1-a1a1a1a1a1", None, 168.0)]


def test_time_to_restore_restores_inside_the_window():
    # r2 rolled back 03-02 01:00, restored by r3 at 05:00 (4 h); r3 reverted, restored by r4 03-03 05:00 (24 h)
    assert metrics.time_to_restore(incident_registry(), window("2024-03-01", "2024-03-05")) == {
        "count": 2, "median": 14.0, "p90": 24.0, "unit": "hours",
        "restored": [
            {"version": "r2-b2b2b2b2b2", "kind": "rolled_back", "failed_at": "2024-03-02T01:00:00+00:00",
             "restored_at": "2024-03-02T05:00:00+00:00", "restored_by": "r3-c3c3c3c3c3", "hours": 4.0},
            {"version": "r3-c3c3c3c3c3", "kind": "reverted", "failed_at": "2024-03-02T05:00:00+00:00",
             "restored_at": "2024-03-03T05:00:00+00:00", "restored_by": "r4-d4d4d4d4d4", "hours": 24.0},
        ],
        "open": []}


def test_time_to_restore_counts_a_failure_before_the_window_restored_inside_it():
    result = metrics.time_to_restore(incident_registry(), window("2024-03-03", "2024-03-05"))
    assert (result["count"], result["median"], result["p90"]) == (1, 24.0, 24.0)
    assert [(i["version"], i["failed_at"], i["hours"]) for i in result["restored"]] == [
        ("r3-c3c3c3c3c3", "2024-03-02T05:00:00+00:00", 24.0)]
    assert result["open"] == []


def test_time_to_restore_lists_a_failure_restored_after_the_window_end_as_open():
    result = metrics.time_to_restore(incident_registry(), window("2024-03-02", "2024-03-03"))
    assert (result["count"], result["median"], result["p90"]) == (1, 4.0, 4.0)
    assert [i["version"] for i in result["restored"]] == ["r2-b2b2b2b2b2"]
    # r3 failed 03-02 05:00, restored 03-03 05:00: after the window end, so open as of 03-03 00:00.
    # Its hours are those open as of the window end (19 h), not the 24 h it took in the end.
    assert result["open"] == [
        {"version": "r3-c3c3c3c3c3", "kind": "reverted", "failed_at": "2024-03-02T05:00:00+00:00",
         "restored_at": "2024-03-03T05:00:00+00:00", "restored_by": "r4-d4d4d4d4d4", "hours": 19.0}]


def test_time_to_restore_of_a_failure_never_restored_runs_to_the_window_end():
    assert metrics.time_to_restore(incident_registry(), window("2024-03-05", "2024-03-08")) == {
        "count": 0, "median": None, "p90": None, "unit": "hours", "restored": [],
        "open": [{"version": "r6-f6f6f6f6f6", "kind": "rolled_back", "failed_at": "2024-03-06T00:00:00+00:00",
                  "restored_at": None, "restored_by": None, "hours": 48.0}]}  # 03-06 00:00 -> 03-08 00:00
    # still open ten days later, and open in any window that ends after the failure
    later = metrics.time_to_restore(incident_registry(), window("2024-03-15", "2024-03-16"))
    assert [(i["version"], i["hours"]) for i in later["open"]] == [("r6-f6f6f6f6f6", 240.0)]
    assert metrics.time_to_restore(incident_registry(), window("2024-03-04", "2024-03-06"))["open"] == []


# ------------------------------------------------------------------------------- stages


def test_stage_statistics_pass_rate_and_durations():
    result = metrics.stage_statistics(stage_registry(), window("2024-03-01", "2024-03-08"))
    assert list(result) == ["1-baking", "2-commit", "3-acceptance", "5-exploratory", "6-capacity",
                            "7-pre-production", "8-production"]
    none = {"count": 0, "median": None, "p90": None}
    assert result["1-baking"] == {"passed": 0, "failed": 0, "superseded": 0, "pass_rate": None, "seconds": none}
    # r1 300 s, r2 600 s, r5 no start (no duration) passed; r3 90 s failed; r4 finished after the window
    assert result["2-commit"] == {"passed": 3, "failed": 1, "superseded": 0, "pass_rate": 0.75,
                                  "seconds": {"count": 3, "median": 300.0, "p90": 600.0}}
    # r2's running entry is not counted
    assert result["3-acceptance"] == {"passed": 0, "failed": 1, "superseded": 0, "pass_rate": 0.0,
                                      "seconds": {"count": 1, "median": 1200.0, "p90": 1200.0}}
    assert result["5-exploratory"] == {"passed": 1, "failed": 0, "superseded": 0, "pass_rate": 1.0,
                                       "seconds": {"count": 1, "median": 14400.0, "p90": 14400.0}}
    # r5 started before the window and finished inside it: counted; r4 finished at the end: not
    assert result["6-capacity"] == {"passed": 1, "failed": 0, "superseded": 0, "pass_rate": 1.0,
                                    "seconds": {"count": 1, "median": 7200.0, "p90": 7200.0}}
    assert result["7-pre-production"]["pass_rate"] is None
    # superseded (r1, 60 s) is outside the pass rate but its time is in the durations: [60, 1800, 1200]
    assert result["8-production"] == {"passed": 1, "failed": 1, "superseded": 1, "pass_rate": 0.5,
                                      "seconds": {"count": 3, "median": 1200.0, "p90": 1800.0}}


def test_stage_statistics_ignore_entries_finishing_outside_the_window():
    result = metrics.stage_statistics(stage_registry(), window("2024-03-02", "2024-03-03"))
    assert result["2-commit"] == {"passed": 1, "failed": 1, "superseded": 0, "pass_rate": 0.5,
                                  "seconds": {"count": 2, "median": 345.0, "p90": 600.0}}  # [600, 90]
    assert result["5-exploratory"]["passed"] == 0 and result["3-acceptance"]["failed"] == 0
    assert result["8-production"] == {"passed": 1, "failed": 1, "superseded": 0, "pass_rate": 0.5,
                                      "seconds": {"count": 2, "median": 1500.0, "p90": 1800.0}}


def test_stage_entries_skip_running_entries_and_other_steps():
    assert sorted((name, entry["result"]) for name, entry in metrics.stage_entries(stage_registry()[:2])) == [
        ("2-commit", "success"), ("2-commit", "success"), ("3-acceptance", "failed"), ("5-exploratory", "success"),
        ("8-production", "success"), ("8-production", "superseded")]


# ------------------------------------------------------------------------------- daily, all, edge cases


def test_daily_deploys_one_row_per_day_with_failures():
    records = incident_registry()
    assert metrics.daily_deploys(records, window("2024-03-01", "2024-03-05")) == [
        {"date": "2024-03-01", "deploys": 1, "failed": 0},
        {"date": "2024-03-02", "deploys": 2, "failed": 2},  # r2 rolled back, r3 later reverted
        {"date": "2024-03-03", "deploys": 1, "failed": 0},
        {"date": "2024-03-04", "deploys": 1, "failed": 0},
    ]
    # a window not on midnight: partial first and last days; r1 at 03-01 00:00 is before it
    assert metrics.daily_deploys(records, window("2024-03-01T12:00", "2024-03-03T12:00")) == [
        {"date": "2024-03-01", "deploys": 0, "failed": 0},
        {"date": "2024-03-02", "deploys": 2, "failed": 2},
        {"date": "2024-03-03", "deploys": 1, "failed": 0},
    ]
    assert metrics.daily_deploys(records, window("2024-03-05", "2024-03-08")) == [
        {"date": "2024-03-05", "deploys": 0, "failed": 0},
        {"date": "2024-03-06", "deploys": 1, "failed": 1},
        {"date": "2024-03-07", "deploys": 0, "failed": 0},
    ]


def test_daily_deploys_of_a_window_given_in_another_time_zone():
    plus_two = timezone(timedelta(hours=2))
    # 03-02 00:00+02:00 .. 03-03 00:00+02:00 is 03-01 22:00Z .. 03-02 22:00Z; the deploy at 03-01 23:00Z is in it
    records = [release(1, "a1", "2024-03-01T20:00:00Z", deployments=(deployed("2024-03-01T23:00:00Z"),))]
    week = Window(datetime(2024, 3, 2, tzinfo=plus_two), datetime(2024, 3, 3, tzinfo=plus_two))
    assert metrics.deployment_frequency(records, week)["deploys"] == 1
    rows = metrics.daily_deploys(records, week)
    assert sum(row["deploys"] for row in rows) == 1


def test_delivery_metrics_gathers_every_figure():
    records = incident_registry()
    result = metrics.delivery_metrics("shop", records, window("2024-03-01", "2024-03-05"))
    assert list(result) == ["application", "window", "releases", "deployment_frequency", "lead_time",
                            "change_failure_rate", "time_to_restore", "stages", "daily"]
    assert result["application"] == "shop" and result["releases"] == 6
    assert result["window"] == {"start": "2024-03-01T00:00:00+00:00", "end": "2024-03-05T00:00:00+00:00",
                                "days": 4.0}
    assert result["deployment_frequency"] == {"deploys": 4, "per_day": 1.0, "per_week": 7.0}
    # a1 02-29 20:00 -> 03-01 00:00 4 h; r3 ships b2 (03-01 20:00 -> 03-02 05:00) 9 h and c3 2 h; d4 4 h; e5 4 h
    assert result["lead_time"] == {"count": 5, "median": 4.0, "p90": 9.0, "unit": "hours"}
    assert result["change_failure_rate"] == {"deploys": 5, "failed": 2, "rate": 0.4}
    assert (result["time_to_restore"]["count"], result["time_to_restore"]["median"]) == (2, 14.0)
    assert result["stages"]["2-commit"]["pass_rate"] is None
    assert [row["deploys"] for row in result["daily"]] == [1, 2, 1, 1]


def test_an_empty_registry():
    week = window("2024-03-01", "2024-03-08")
    assert metrics.deploys([]) == [] and metrics.incidents([]) == []
    assert metrics.deployment_frequency([], week) == {"deploys": 0, "per_day": 0.0, "per_week": 0.0}
    assert metrics.lead_time([], week) == {"count": 0, "median": None, "p90": None, "unit": "hours"}
    assert metrics.change_failure_rate([], week) == {"deploys": 0, "failed": 0, "rate": None}
    assert metrics.time_to_restore([], week) == {"count": 0, "median": None, "p90": None, "unit": "hours",
                                                 "restored": [], "open": []}
    assert all(s == {"passed": 0, "failed": 0, "superseded": 0, "pass_rate": None,
                     "seconds": {"count": 0, "median": None, "p90": None}}
               for s in metrics.stage_statistics([], week).values())
    assert len(metrics.daily_deploys([], week)) == 7
    assert {row["deploys"] + row["failed"] for row in metrics.daily_deploys([], week)} == {0}
    assert metrics.delivery_metrics("shop", [], week)["releases"] == 0


def test_a_single_release():
    record = release(1, "a1", "2024-03-01T09:00:00Z", deployments=(deployed("2024-03-01T12:00:00Z"),), stages={
        "8-production": stage("success", "2024-03-01T11:00:00Z", "2024-03-01T12:00:30Z")})
    week = window("2024-03-01", "2024-03-08")
    result = metrics.delivery_metrics("shop", [record], week)
    assert result["releases"] == 1
    assert result["deployment_frequency"] == {"deploys": 1, "per_day": pytest.approx(0.142857, abs=1e-6),
                                              "per_week": pytest.approx(1.0)}
    assert result["lead_time"] == {"count": 1, "median": 3.0, "p90": 3.0, "unit": "hours"}
    assert result["change_failure_rate"] == {"deploys": 1, "failed": 0, "rate": 0.0}
    assert result["time_to_restore"] == {"count": 0, "median": None, "p90": None, "unit": "hours",
                                         "restored": [], "open": []}
    assert result["stages"]["8-production"] == {"passed": 1, "failed": 0, "superseded": 0, "pass_rate": 1.0,
                                                "seconds": {"count": 1, "median": 3630.0, "p90": 3630.0}}
    assert result["daily"][0] == {"date": "2024-03-01", "deploys": 1, "failed": 0}
    # a release built but never deployed
    assert metrics.delivery_metrics("shop", [release(1, "a1", "2024-03-01T09:00:00Z")], week)[
        "deployment_frequency"]["deploys"] == 0


def test_a_rollback_restores_when_the_previous_version_serves_again_not_at_the_next_deploy():
    """Issue 18: production served the previous version again within a second of the rollback,
    yet time to restore ran until the next deploy. DORA: until production serves a good version."""
    after_switch = {"result": "rolled_back", "started_at": "2024-03-02T00:50:00Z", "at": "2024-03-02T01:02:00Z",
                    "run_id": "r", "phase": "after_switch", "restored_version": version(1, "a1"),
                    "switched_at": "2024-03-02T01:00:00Z", "restored_at": "2024-03-02T01:00:30Z"}
    before_switch = {"result": "rolled_back", "started_at": "2024-03-03T00:00:00Z", "at": "2024-03-03T00:05:00Z",
                     "run_id": "s", "phase": "before_switch", "restored_version": version(1, "a1")}
    records = [
        release(1, "a1", "2024-03-01T00:00:00Z", deployments=(deployed("2024-03-01T01:00:00Z"),)),
        release(2, "b2", "2024-03-01T20:00:00Z", deployments=(after_switch,)),
        release(3, "c3", "2024-03-02T20:00:00Z", deployments=(before_switch,)),
        release(4, "d4", "2024-03-04T00:00:00Z", deployments=(deployed("2024-03-05T00:00:00Z", version(1, "a1")),)),
    ]
    result = metrics.time_to_restore(records, window("2024-03-01", "2024-03-08"))
    rows = [(i["version"], i["failed_at"], i["restored_at"], i["restored_by"], i["hours"]) for i in result["restored"]]
    assert rows == [
        ("r2-b2b2b2b2b2", "2024-03-02T01:00:00+00:00", "2024-03-02T01:00:30+00:00", "r1-a1a1a1a1a1", 0.008),
        ("r3-c3c3c3c3c3", "2024-03-03T00:05:00+00:00", "2024-03-03T00:05:00+00:00", "r1-a1a1a1a1a1", 0.0)]
    # Both attempts are still failed changes.
    assert metrics.change_failure_rate(records, window("2024-03-01", "2024-03-08"))["failed"] == 2
