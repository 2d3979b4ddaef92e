"""Unit tests for build.py: tarball layout, metadata and byte-for-byte reproducibility."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

from sample_service import app as service_app

SERVICE_ROOT = Path(__file__).resolve().parents[2]


def _load_build_module() -> ModuleType:
    # Load by path: the name "build" would otherwise collide with PyPA's `build`.
    spec = importlib.util.spec_from_file_location("sample_service_build", SERVICE_ROOT / "build.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build_module()

EXPECTED_MEMBERS = [
    "run.sh",
    "sample_service",
    "sample_service/COMMIT",
    "sample_service/VERSION",
    "sample_service/__init__.py",
    "sample_service/__main__.py",
    "sample_service/app.py",
]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A copy of the real package plus junk the build must leave out."""
    package = tmp_path / "src" / "sample_service"
    shutil.copytree(
        build.SRC_PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"junk")
    (package / "stale.pyc").write_bytes(b"junk")
    (package / "VERSION").write_text("0.0.0-stale\n")  # replaced by the build
    (package / "SETTINGS.json").write_text('{"fail_health_after": 0}')  # only from settings.json
    (package / ".DS_Store").write_bytes(b"junk")
    return package


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tarball_layout_and_metadata(tmp_path: Path, src: Path) -> None:
    path = build.build(tmp_path / "dist", "1.2.3", "abc1234", src=src, epoch=1_700_000_000)
    assert path == tmp_path / "dist" / "sample-service-1.2.3.tar.gz"

    with tarfile.open(path, "r:gz") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == EXPECTED_MEMBERS
        for member in members:
            assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "root", "root")
            assert member.mtime == 1_700_000_000
            if member.isdir() or member.name == "run.sh":
                assert member.mode == 0o755
            else:
                assert member.isfile()
                assert member.mode == 0o644

        def read(name: str) -> bytes:
            extracted = tar.extractfile(name)
            assert extracted is not None
            return extracted.read()

        assert read("sample_service/VERSION") == b"1.2.3\n"
        assert read("sample_service/COMMIT") == b"abc1234\n"
        assert read("sample_service/app.py") == (src / "app.py").read_bytes()
        run_sh = read("run.sh").decode()
        assert run_sh.startswith("#!/bin/sh\n")
        assert 'PYTHONPATH="$HERE"' in run_sh
        assert 'exec "${PYTHON:-python3}" -m sample_service "$@"' in run_sh


def test_builds_are_byte_for_byte_reproducible(tmp_path: Path, src: Path) -> None:
    first = build.build(tmp_path / "a", "1.0.0", "abc", src=src)
    # touching sources (as a fresh checkout does) must not change the output
    for path in src.rglob("*"):
        os.utime(path, (2_000_000_000, 2_000_000_000))
    second = build.build(tmp_path / "b", "1.0.0", "abc", src=src)
    assert first.read_bytes() == second.read_bytes()
    assert sha256(first) == sha256(second)

    header = first.read_bytes()[:10]
    assert header[:2] == b"\x1f\x8b"
    assert header[4:8] == b"\0\0\0\0"  # gzip mtime
    assert not header[3] & 0x08  # no original file name stored
    with gzip.open(first) as raw, tarfile.open(fileobj=io.BytesIO(raw.read())) as tar:
        assert all(m.mtime == 0 for m in tar.getmembers())

    other = build.build(tmp_path / "c", "1.0.1", "abc", src=src)
    assert other.read_bytes() != first.read_bytes()


def test_main_uses_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {
        "DEPLOYLINE_VERSION": "4.5.6",
        "DEPLOYLINE_COMMIT": "0123abc",
        "SOURCE_DATE_EPOCH": "86400",
    }
    assert build.main(["--out", str(tmp_path / "out")], environ=env) == 0
    expected = tmp_path / "out" / "sample-service-4.5.6.tar.gz"
    assert capsys.readouterr().out.strip() == str(expected.resolve())
    with tarfile.open(expected) as tar:
        assert tar.getmember("run.sh").mtime == 86400
        extracted = tar.extractfile("sample_service/COMMIT")
        assert extracted is not None
        assert extracted.read() == b"0123abc\n"


def test_main_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert build.main(["--out", str(tmp_path)], environ={}) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.name == "sample-service-dev.tar.gz"
    with tarfile.open(path) as tar:
        extracted = tar.extractfile("sample_service/COMMIT")
        assert extracted is not None
        assert extracted.read() == b"unknown\n"
        assert tar.getmember("run.sh").mtime == 0


@pytest.mark.parametrize(
    "env",
    [
        {"DEPLOYLINE_VERSION": "../evil"},
        {"DEPLOYLINE_VERSION": "1.0 beta"},
        {"DEPLOYLINE_COMMIT": "abc\ndef"},
        {"SOURCE_DATE_EPOCH": "yesterday"},
    ],
)
def test_main_rejects_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], env: dict[str, str]
) -> None:
    assert build.main(["--out", str(tmp_path)], environ=env) == 2
    assert "error" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_extracted_artifact_reports_its_version(tmp_path: Path, src: Path) -> None:
    path = build.build(tmp_path / "dist", "7.8.9", "cafe", src=src)
    target = tmp_path / "install"
    with tarfile.open(path) as tar:
        tar.extractall(target, filter="data")
    result = subprocess.run(
        [sys.executable, "-c", "import sample_service as s; print(s.__version__)"],
        env={**os.environ, "PYTHONPATH": str(target), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert result.stdout.strip() == "7.8.9"


# ------------------------------------------------------------------ settings.json


def read_member(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tar:
        extracted = tar.extractfile(name)
        assert extracted is not None
        return extracted.read()


def test_absent_settings_package_nothing(tmp_path: Path, src: Path) -> None:
    plain = build.build(tmp_path / "a", "1.0.0", "abc", src=src)
    absent = build.build(
        tmp_path / "b", "1.0.0", "abc", src=src, settings_file=tmp_path / "settings.json"
    )
    assert plain.read_bytes() == absent.read_bytes()
    with tarfile.open(absent) as tar:
        assert [m.name for m in tar.getmembers()] == EXPECTED_MEMBERS


def test_settings_are_packaged_canonically(tmp_path: Path, src: Path) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text('{ "fail_health_stages": ["production"],\n  "fail_health_after": 5 }')
    first = build.build(
        tmp_path / "a", "1.0.0", "abc", src=src, epoch=86400, settings_file=settings
    )
    with tarfile.open(first) as tar:
        names = [m.name for m in tar.getmembers()]
        member = tar.getmember("sample_service/SETTINGS.json")
    assert names == sorted([*EXPECTED_MEMBERS, "sample_service/SETTINGS.json"])
    assert (member.mode, member.mtime, member.uid, member.gid) == (0o644, 86400, 0, 0)
    packaged = read_member(first, "sample_service/SETTINGS.json")
    assert (
        packaged
        == b'{\n  "fail_health_after": 5,\n  "fail_health_stages": [\n    "production"\n  ]\n}\n'
    )
    assert service_app.parse_settings(packaged) == service_app.Settings(5.0, ("production",))

    # same settings, other spelling and mtime: same bytes
    settings.write_text('{"fail_health_after": 5, "fail_health_stages": ["production"]}')
    os.utime(settings, (2_000_000_000, 2_000_000_000))
    second = build.build(
        tmp_path / "b", "1.0.0", "abc", src=src, epoch=86400, settings_file=settings
    )
    assert sha256(first) == sha256(second)

    settings.write_text('{"fail_health_after": 6, "fail_health_stages": ["production"]}')
    third = build.build(
        tmp_path / "c", "1.0.0", "abc", src=src, epoch=86400, settings_file=settings
    )
    assert sha256(third) != sha256(first)


def test_main_packages_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text('{"fail_health_after": 0}')
    out = tmp_path / "out"
    assert build.main(["--out", str(out), "--settings", str(settings)], environ={}) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert json.loads(read_member(Path(captured.out.strip()), "sample_service/SETTINGS.json")) == {
        "fail_health_after": 0
    }


def test_main_reads_settings_next_to_build_py() -> None:
    assert build.SETTINGS_FILE == SERVICE_ROOT / "settings.json"
    assert "SETTINGS.json" in build.GENERATED_FILES  # never copied from src/


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ('{"fail_health_after": "5"}', "'fail_health_after'"),
        ('{"fail_health_after": -1}', "'fail_health_after'"),
        ('{"fail_health_stages": "production"}', "'fail_health_stages'"),
        ('{"fail_health_stages": [5]}', "'fail_health_stages' item 0"),
        ('{"fail_after": 5}', "unknown key 'fail_after'"),
        ('{"fail_health_after": 5', "not valid JSON"),
    ],
)
def test_main_rejects_bad_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, key: str
) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text(content)
    out = tmp_path / "out"
    assert build.main(["--out", str(out), "--settings", str(settings)], environ={}) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"build.py: error: {settings}: ")
    assert key in err
    assert not out.exists()


def test_main_warns_about_unknown_stages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text('{"fail_health_after": 5, "fail_health_stages": ["prod", "production"]}')
    assert build.main(["--out", str(tmp_path / "out"), "--settings", str(settings)], {}) == 0
    err = capsys.readouterr().err
    assert "warning" in err
    assert "'prod'" in err
    assert "'production'" not in err


@pytest.mark.parametrize(
    "content",
    [
        '{"fail_health_after": 5, "fail_health_stages": ["production"]}',
        '{"fail_health_after": null}',
        '{"fail_health_after": 0.5, "fail_health_stages": []}',
        "{}",
        '{"fail_health_after": 1, "fail_health_after": 1}',
        '{"fail_health_after": true}',
        '{"fail_health_after": NaN}',
        '{"fail_health_after": 1e999}',
        '{"fail_health_stages": null}',
        '{"fail_health_stages": ["production "]}',
        '{"other": 1}',
        "[]",
        "",
    ],
)
def test_build_and_service_validate_settings_alike(content: str) -> None:
    """build.py keeps a copy of the service's rules: they must accept and reject the same."""

    def outcome(parse: object, error: type[Exception]) -> object:
        try:
            return parse(content, "f.json")  # type: ignore[operator]
        except error as exc:
            return f"error: {exc}"

    service = outcome(service_app.parse_settings, service_app.SettingsError)
    built = outcome(build.parse_settings, build.SettingsError)
    if isinstance(service, str):
        assert built == service
    else:
        assert isinstance(built, dict)
        assert service_app.parse_settings(build.settings_bytes(built)) == service
