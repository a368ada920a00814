"""The bare-metal recipe: `deploy/luminagrid-worker.service` is a unit systemd accepts as written.

`systemd-analyze verify` (where it exists; no running systemd is needed) parses the unit the way
systemd would and checks that ExecStart's binary is there. The unit names the installed path
(/opt/luminagrid/.venv/bin/celery), so the test verifies a copy whose ExecStart points at this
environment's celery. verify exits 0 even for unknown keys or bad values (it only warns), so the
test fails on any warning that names the unit, and checks first that such a warning does appear
for a broken copy.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

UNIT = REPO / "deploy" / "luminagrid-worker.service"
ENV_EXAMPLE = REPO / "deploy" / "worker.env.example"
INSTALLED_CELERY = "/opt/luminagrid/.venv/bin/celery"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")


def directives(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values, in order (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = sections.setdefault(line[1:-1], {})
            continue
        assert section is not None and "=" in line, f"not a directive: {raw!r}"
        key, value = line.split("=", 1)
        section.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_the_unit_restarts_a_celery_worker_from_its_env_file_and_stops_it_warm() -> None:
    unit = directives(UNIT.read_text())
    service = unit["Service"]
    assert service["Restart"] == ["always"]
    # No "-" before the path: a missing file fails the start (rather than a worker on localhost).
    assert service["EnvironmentFile"] == ["/etc/luminagrid/worker.env"]
    assert service["ExecStart"] == [f"{INSTALLED_CELERY} -A luminagrid worker --loglevel INFO"]
    assert service["User"] != ["root"] and service["User"]
    # Warm shutdown: SIGTERM to Celery's main process only; its pool processes would die at once on one.
    assert service["KillSignal"] == ["SIGTERM"] and service["KillMode"] == ["mixed"]
    assert 10 <= int(service["TimeoutStopSec"][0]) <= 600
    assert service["NoNewPrivileges"] == ["yes"] and service["ProtectSystem"] == ["strict"]
    assert service["PrivateTmp"] == ["yes"]
    assert "network-online.target" in unit["Unit"]["After"][0].split()
    assert "network-online.target" in unit["Unit"]["Wants"][0].split()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_env_example_sets_only_variables_luminagrid_reads() -> None:
    read = set(re.findall(r"LUMINAGRID_[A-Z_]+", "".join(
        p.read_text() for p in (*(REPO / "luminagrid").glob("*.py"), REPO / "celeryconfig.py"))))
    names = re.findall(r"^#?(LUMINAGRID_[A-Z_]+)=", ENV_EXAMPLE.read_text(), re.MULTILINE)
    assert "LUMINAGRID_BROKER_URL" in names
    assert set(names) <= read, set(names) - read
    set_lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")]
    assert set_lines == ["LUMINAGRID_BROKER_URL=redis://:SECRET@redis-host:6379/0"]


def verify(tmp_path: Path, text: str) -> tuple[int, list[str]]:
    """Run `systemd-analyze verify` on `text` as luminagrid-worker.service, ExecStart pointed at
    this environment's celery; return the exit code and the output lines that name the unit."""
    celery = Path(sys.executable).with_name("celery")
    assert celery.is_file(), f"no celery beside {sys.executable}"
    assert INSTALLED_CELERY in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(INSTALLED_CELERY, str(celery)))
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], check=False, capture_output=True, text=True,
                          timeout=60)
    output = (proc.stdout + proc.stderr).splitlines()
    return proc.returncode, [line for line in output if UNIT.name in line or str(tmp_path) in line]


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    code, about_unit = verify(tmp_path, UNIT.read_text())
    assert code == 0 and about_unit == [], about_unit


@needs_systemd_analyze
def test_systemd_analyze_verify_would_report_a_broken_unit(tmp_path: Path) -> None:
    """The check above means something: a misspelt key and a bad value are reported."""
    broken = UNIT.read_text().replace("Restart=always", "Restartt=always")
    broken = broken.replace("KillMode=mixed", "KillMode=warm")
    _, about_unit = verify(tmp_path, broken)
    assert any("Restartt" in line for line in about_unit), about_unit
    assert any("warm" in line for line in about_unit), about_unit
