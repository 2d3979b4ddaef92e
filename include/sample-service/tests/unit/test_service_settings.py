"""Unit tests for the packaged build settings (SETTINGS.json) and the fail-health switch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sample_service.app import (
    ENV_FAIL_HEALTH_AFTER,
    ENV_STAGE,
    SETTINGS_FILE,
    App,
    Config,
    Settings,
    SettingsError,
    load_settings,
    parse_settings,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def write_settings(path: Path, payload: object) -> Path:
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


@pytest.fixture
def settings_file(tmp_path: Path) -> Path:
    return tmp_path / "SETTINGS.json"


# ------------------------------------------------------------------ parse_settings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{}", Settings()),
        ('{"fail_health_after": null}', Settings()),
        ('{"fail_health_after": 0}', Settings(0.0)),
        ('{"fail_health_after": 5}', Settings(5.0)),
        ('{"fail_health_after": 2.5, "fail_health_stages": []}', Settings(2.5)),
        (
            '{"fail_health_after": 5, "fail_health_stages": ["production"]}',
            Settings(5.0, ("production",)),
        ),
        (
            '{"fail_health_stages": ["capacity", "production"], "fail_health_after": 1e1}',
            Settings(10.0, ("capacity", "production")),
        ),
        ('\ufeff{"fail_health_after": 1}'.encode(), Settings(1.0)),  # UTF-8 BOM
    ],
)
def test_parse_valid_settings(text: str | bytes, expected: Settings) -> None:
    assert parse_settings(text, "x.json") == expected


# (content, text the error must contain besides the file name)
INVALID_SETTINGS = [
    ("", "not valid JSON"),
    ("{", "not valid JSON"),
    ('{"fail_health_after": 5,}', "not valid JSON"),
    (b"\xff\xfe\xfa", "not valid JSON"),
    ("[]", "must be a JSON object"),
    ("5", "must be a JSON object"),
    ('{"fail_health_afterr": 5}', "unknown key 'fail_health_afterr'"),
    ('{"fail_health_after": 5, "extra": 1}', "unknown key 'extra'"),
    ('{"fail_health_after": "5"}', "key 'fail_health_after'"),
    ('{"fail_health_after": true}', "key 'fail_health_after'"),
    ('{"fail_health_after": -1}', "key 'fail_health_after'"),
    ('{"fail_health_after": NaN}', "NaN"),
    ('{"fail_health_after": Infinity}', "Infinity"),
    ('{"fail_health_after": 1e999}', "key 'fail_health_after'"),
    ('{"fail_health_after": ' + "9" * 400 + "}", "key 'fail_health_after'"),
    ('{"fail_health_after": [5]}', "key 'fail_health_after'"),
    ('{"fail_health_after": 1, "fail_health_after": 2}', "key 'fail_health_after'"),
    ('{"fail_health_stages": "production"}', "key 'fail_health_stages'"),
    ('{"fail_health_stages": null}', "key 'fail_health_stages'"),
    ('{"fail_health_stages": {"production": true}}', "key 'fail_health_stages'"),
    ('{"fail_health_stages": ["production", 1]}', "key 'fail_health_stages' item 1"),
    ('{"fail_health_stages": [""]}', "key 'fail_health_stages' item 0"),
    ('{"fail_health_stages": [" production"]}', "key 'fail_health_stages' item 0"),
]


@pytest.mark.parametrize(("text", "message"), INVALID_SETTINGS)
def test_parse_invalid_settings_names_file_and_key(text: str | bytes, message: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        parse_settings(text, "/opt/x/SETTINGS.json")
    assert str(excinfo.value).startswith("/opt/x/SETTINGS.json: ")
    assert message in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)  # what __main__ reports as a startup error


@pytest.mark.parametrize(
    ("settings", "stage", "expected"),
    [
        (Settings(), "production", None),
        (Settings(5.0), "", 5.0),
        (Settings(5.0), "acceptance", 5.0),
        (Settings(5.0, ("production",)), "production", 5.0),
        (Settings(5.0, ("production",)), "acceptance", None),
        (Settings(5.0, ("production",)), "", None),
        (Settings(5.0, ("production",)), "Production", None),
        (Settings(None, ("production",)), "production", None),
        (Settings(0.0, ("capacity", "production")), "capacity", 0.0),
    ],
)
def test_switch_is_limited_to_the_listed_stages(
    settings: Settings, stage: str, expected: float | None
) -> None:
    assert settings.fail_health_after_in(stage) == expected


# ------------------------------------------------------------------ load_settings


def test_missing_settings_file_means_switch_off(settings_file: Path) -> None:
    assert load_settings(settings_file) == Settings()


def test_source_checkout_has_no_packaged_settings() -> None:
    # build.py writes SETTINGS.json into the tarball only; a stray copy here would
    # silently change how the unit tests and `python -m sample_service` behave.
    assert not SETTINGS_FILE.exists()
    assert SETTINGS_FILE.name == "SETTINGS.json"
    assert SETTINGS_FILE.parent.name == "sample_service"


def test_unreadable_settings_file_is_an_error(settings_file: Path) -> None:
    settings_file.mkdir()  # exists, but cannot be read as a file
    with pytest.raises(SettingsError, match=r"SETTINGS\.json: cannot be read"):
        load_settings(settings_file)


def test_load_settings_error_names_the_path(settings_file: Path) -> None:
    write_settings(settings_file, {"fail_health_after": "soon"})
    with pytest.raises(SettingsError) as excinfo:
        load_settings(settings_file)
    assert str(settings_file) in str(excinfo.value)
    assert "'fail_health_after'" in str(excinfo.value)


# ------------------------------------------------------------------ Config.from_env


def test_from_env_uses_packaged_settings(settings_file: Path) -> None:
    write_settings(settings_file, {"fail_health_after": 5})
    config = Config.from_env({}, settings_file)
    assert config.fail_health_after == 5.0
    assert config.fail_health_source == "SETTINGS.json"


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ("production", 5.0),
        (" production ", 5.0),
        ("acceptance", None),
        ("preproduction", None),
        ("", None),
        (None, None),
    ],
)
def test_from_env_limits_settings_to_stages(
    settings_file: Path, stage: str | None, expected: float | None
) -> None:
    write_settings(settings_file, {"fail_health_after": 5, "fail_health_stages": ["production"]})
    env = {} if stage is None else {ENV_STAGE: stage}
    config = Config.from_env(env, settings_file)
    assert config.fail_health_after == expected
    if expected is not None:
        assert config.fail_health_source == "SETTINGS.json, stage production"


@pytest.mark.parametrize("stage", ["production", "acceptance"])
def test_environment_variable_wins_over_settings(settings_file: Path, stage: str) -> None:
    write_settings(settings_file, {"fail_health_after": 5, "fail_health_stages": ["production"]})
    config = Config.from_env({ENV_FAIL_HEALTH_AFTER: "30", ENV_STAGE: stage}, settings_file)
    assert config.fail_health_after == 30.0
    assert config.fail_health_source == ENV_FAIL_HEALTH_AFTER


def test_empty_environment_variable_leaves_settings_in_charge(settings_file: Path) -> None:
    write_settings(settings_file, {"fail_health_after": 5})
    assert Config.from_env({ENV_FAIL_HEALTH_AFTER: " "}, settings_file).fail_health_after == 5.0


def test_bad_settings_fail_even_when_the_variable_is_set(settings_file: Path) -> None:
    write_settings(settings_file, {"fail_health_after": 5, "typo": True})
    with pytest.raises(SettingsError, match="unknown key 'typo'"):
        Config.from_env({ENV_FAIL_HEALTH_AFTER: "30"}, settings_file)


def test_settings_drive_the_health_endpoint(settings_file: Path) -> None:
    write_settings(settings_file, {"fail_health_after": 5, "fail_health_stages": ["production"]})
    clock = FakeClock()
    in_production = App(Config.from_env({ENV_STAGE: "production"}, settings_file), clock=clock)
    in_acceptance = App(Config.from_env({ENV_STAGE: "acceptance"}, settings_file), clock=clock)
    assert in_production.handle("GET", "/health").status == 200
    clock.now += 5
    assert in_production.handle("GET", "/health").status == 503
    assert in_production.handle("GET", "/version").status == 200
    assert in_acceptance.handle("GET", "/health").status == 200


# ------------------------------------------------------------------ startup (real process)


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """A copy of the package, as an installed artifact would lay it out."""
    target = tmp_path / "install"
    shutil.copytree(
        SETTINGS_FILE.parent,
        target / "sample_service",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "SETTINGS.json"),
    )
    return target


def run_python(installed: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` against the installed copy, without the caller's switches."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAMPLE_SERVICE_")}
    clean.pop(ENV_STAGE, None)
    return subprocess.run(
        [sys.executable, *args],
        env={**clean, "PYTHONPATH": str(installed), "PYTHONDONTWRITEBYTECODE": "1", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_bad_packaged_settings_stop_the_service_at_startup(installed: Path) -> None:
    settings = installed / "sample_service" / "SETTINGS.json"
    write_settings(settings, {"fail_health_after": 5, "fail_health_stages": "production"})
    result = run_python(installed, "-m", "sample_service", "--port", "0", "--quiet")
    assert result.returncode == 2
    assert str(settings.resolve()) in result.stderr
    assert "key 'fail_health_stages'" in result.stderr
    assert "listening" not in result.stderr


def test_packaged_settings_are_used_by_the_installed_service(installed: Path) -> None:
    write_settings(
        installed / "sample_service" / "SETTINGS.json",
        {"fail_health_after": 7, "fail_health_stages": ["production"]},
    )
    code = "from sample_service.app import Config; print(Config.from_env().fail_health_after)"
    for stage, expected in [("production", "7.0"), ("acceptance", "None")]:
        result = run_python(installed, "-c", code, **{ENV_STAGE: stage})
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected
