"""The lock (requirements.lock) agrees with pyproject.toml: every dependency of qlab and of its
[dev,eval] extras pinned exactly, at a version inside its range; no torch (the machine's) and
nothing only a CUDA torch brings; the deliberate pins (pyproject.toml's [tool.qlab.lock]) are the
lock's; resolved against the CPU torch the Makefile installs. And a venv that `make install` built
from the lock holds exactly the locked versions. Reads files and installed metadata only: no network."""

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")

ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = ROOT / "requirements.lock"
MACHINE = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")  # as qlab/lock.py


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(lines: list[str], where: str) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert m, f"{where}: not an exact `name==version` pin: {line!r}"
        assert canonical(m[1]) not in pins, f"{where}: {m[1]} pinned twice"
        pins[canonical(m[1])] = m[2]
    return pins


LOCK = read_pins(LOCK_FILE.read_text().splitlines(), LOCK_FILE.name)
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
REQUIREMENTS = [Requirement(r) for r in
                PROJECT["dependencies"] + PROJECT["optional-dependencies"]["dev"] + PROJECT["optional-dependencies"]["eval"]]
DIRECT = {canonical(r.name) for r in REQUIREMENTS}


@pytest.mark.parametrize("req", [r for r in REQUIREMENTS if r.name != "torch"], ids=str)
def test_every_dependency_is_pinned_inside_its_range(req):
    version = LOCK.get(canonical(req.name))
    assert version, f"pyproject.toml requires {req} but requirements.lock does not pin it: make lock"
    assert req.specifier.contains(version, prereleases=True), \
        f"requirements.lock pins {req.name}=={version}, outside pyproject.toml's {req}: make lock"


def test_the_lock_names_no_torch():
    """torch is the machine's (a user's CUDA build, or the CPU build the Makefile installs): pinning
    it, or the CUDA libraries only a CUDA torch brings, would replace or fight that torch."""
    assert "torch" in DIRECT  # pyproject keeps a range that any torch satisfies
    assert [n for n in LOCK if MACHINE.match(n) and n not in DIRECT - {"torch"}] == []


def test_the_lock_is_sorted_exact_and_canonical():
    lines = [l for l in LOCK_FILE.read_text().splitlines() if l and not l.startswith("#")]
    names = [l.split("==")[0] for l in lines]
    assert names == sorted(names) and len(names) == len(LOCK)
    for name, version in LOCK.items():
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name), name
        try:
            Version(version)
        except InvalidVersion:
            pytest.fail(f"{name}=={version}: not a version")


def test_deliberate_pins_are_the_locks():
    pins = read_pins(PYPROJECT["tool"]["qlab"]["lock"]["pins"], "pyproject.toml [tool.qlab.lock] pins")
    assert pins and {n: LOCK.get(n) for n in pins} == pins


def test_the_lock_was_resolved_against_the_makefiles_cpu_torch():
    makefile = (ROOT / "Makefile").read_text()
    cpu_torch = re.search(r"^CPU_TORCH := torch==(\S+)$", makefile, re.M)[1]
    resolved = re.search(r"against torch (\S+)", LOCK_FILE.read_text())[1]
    assert Version(resolved).public == Version(cpu_torch).public
    assert re.search(r"^LOCK \?= requirements\.lock$", makefile, re.M), "make install uses the lock by default"


def test_a_venv_installed_from_the_lock_holds_its_versions():
    """`make install` records the LOCK it installed with in the venv (.qlab-lock); where that is the
    lock, every locked package this interpreter sees is at its pinned version (the venv's copy
    shadows another in system site-packages)."""
    choice = Path(sys.prefix) / ".qlab-lock"
    if not choice.is_file() or choice.read_text().strip() != "requirements.lock":
        pytest.skip("this venv was not installed from requirements.lock (LOCK= or not by make install)")
    off = {}
    for name, version in LOCK.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            off[name] = (version, None)
            continue
        if Version(installed) != Version(version):
            off[name] = (version, installed)
    assert off == {}, f"(locked, installed): {off}; make install again (the stamp: rm {Path(sys.prefix) / '.qlab-installed'})"
