"""Write requirements.lock: every package `make install` installs, pinned, torch excluded.

    python3 -m qlab.lock                                 # re-lock: current pins kept where they still fit
    python3 -m qlab.lock --pin transformers==5.18.0 --pin peft==0.21.2
    python3 -m qlab.lock --upgrade                       # everything not pinned in pyproject.toml to its newest

`make lock [PIN="name==version ..."] [UPGRADE=1]` runs this. It resolves in a throwaway venv (system
site-packages off, so nothing this machine happens to have leaks in) with pip's own resolver
(`pip install --dry-run --ignore-installed --report`): the same pip, configuration, index and
interpreter that `make install` then installs with, and nothing is installed. The resolution asks
for qlab[dev,eval], pip itself, and the CPU torch (`--torch`, the Makefile's CPU_TORCH) so that
torch's own dependencies are pinned too; torch and what only a CUDA torch brings (nvidia-*,
triton) are then left out: torch is the machine's. Constraints in: pyproject.toml's
[tool.qlab.lock] pins (the deliberate pins, with reasons as comments) and, unless --upgrade, the
current lock's pins (so a re-lock moves only what it must); when the current pins no longer fit, it
re-resolves from the deliberate pins alone and says so. Standard library only (tomllib; on Python
3.10, tomli where installed), and nothing else from qlab: it runs before any venv exists, from the
repository root (`python3 -m qlab.lock`, qlab not installed).
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
PINS_AT = "pyproject.toml's [tool.qlab.lock] pins"
# the machine's torch and what a CUDA torch brings (cuda-toolkit, cuda-bindings, nvidia-*-cu13, triton);
# a package qlab itself requires (nvidia-ml-py) stays
MACHINE = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*(#.*)?$")
# a line of the pins array: `  "name==version",  # comment`
ENTRY = re.compile(r'^(\s*)"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#"]+)"\s*,\s*(#.*)?$')


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str, where: str) -> dict[str, str]:
    """name -> version of every `name==version` line (comments and blank lines skipped)."""
    pins = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            m = PIN.match(line)
            if not m:
                sys.exit(f"{where}: not a `name==version` pin: {line!r}")
            pins[canonical(m[1])] = m[2]
    return pins


def pins_block(lines: list[str]) -> tuple[int, int]:
    """(first, end): the lines inside [tool.qlab.lock]'s `pins = [ ... ]` (one entry or comment a line)."""
    table = next((i for i, l in enumerate(lines) if l.strip() == "[tool.qlab.lock]"), None)
    if table is None:
        sys.exit("lock: pyproject.toml has no [tool.qlab.lock] table (its pins = [...] are the deliberate pins)")
    for i in range(table + 1, len(lines)):
        line = lines[i].strip()
        if line.startswith("["):
            break
        if re.match(r"^pins\s*=\s*\[\s*(#.*)?$", line):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "]"), None)
            if end is not None:
                return i + 1, end
            break
    sys.exit("lock: pyproject.toml's [tool.qlab.lock] needs `pins = [`, one pin a line, and `]` on a line of its own")


def read_pyproject_pins(text: str) -> dict[str, str]:
    """name -> version of pyproject.toml's [tool.qlab.lock] pins, read with tomllib and checked line by line
    (so that --pin can edit them as text, their comments kept)."""
    if tomllib is None:
        sys.exit(f"lock: reading {PINS_AT} needs Python 3.11+ (tomllib) or, on 3.10, tomli: "
                 "run it with python3.11 (make lock PYTHON=python3.11) or pip install tomli")
    try:
        pins = tomllib.loads(text)["tool"]["qlab"]["lock"]["pins"]
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as e:
        sys.exit(f"lock: {PINS_AT}: {e!r}")
    first, end = pins_block(text.splitlines())
    lines = [l.strip() for l in text.splitlines()[first:end]]
    entries = [l for l in lines if l and not l.startswith("#")]
    if not all(ENTRY.match(l) for l in entries) or [l.split('"')[1] for l in entries] != pins:
        sys.exit(f"lock: {PINS_AT}: one \"name==version\", a line, each with its comma (comments after it or "
                 "on lines of their own)")
    return read_pins("\n".join(pins), PINS_AT)


def with_pins(text: str, specs: list[str]) -> str:
    """pyproject.toml's text with each `name==version` replaced (or appended) in [tool.qlab.lock]'s pins, every
    other line and comment kept."""
    lines = text.splitlines()
    for spec in specs:
        m = PIN.match(spec.strip())
        if not m:
            sys.exit(f"--pin {spec!r}: give name==version")
        name = canonical(m[1])
        first, end = pins_block(lines)
        at = [i for i in range(first, end) if (e := ENTRY.match(lines[i])) and canonical(e[2]) == name]
        if at:
            e = ENTRY.match(lines[at[0]])
            lines[at[0]] = f'{e[1]}"{m[1]}=={m[2]}",' + (f"  {e[4]}" if e[4] else "")
        else:
            lines.insert(end, f'  "{m[1]}=={m[2]}",')
    return "\n".join(lines) + "\n"


def pins_comment(text: str) -> list[str]:
    """[tool.qlab.lock]'s pins with their comments, as the lock's header quotes them."""
    lines = text.splitlines()
    first, end = pins_block(lines)
    out = []
    for line in lines[first:end]:
        if e := ENTRY.match(line):
            out.append(f"#   {e[2]}=={e[3]}" + (f"  {e[4]}" if e[4] else ""))
        elif line.strip():
            out.append(line.strip())
    return out


def resolve(py: Path, torch: str, constraints: dict[str, str], work: Path) -> dict | None:
    """pip's resolution of qlab[dev,eval] + pip + torch under the constraints (None: they conflict)."""
    cfile, report = work / "constraints.txt", work / "report.json"
    cfile.write_text("".join(f"{n}=={v}\n" for n, v in sorted(constraints.items())))
    cmd = [str(py), "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
           "-c", str(cfile), torch, "pip", ".[dev,eval]"]
    done = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(report.read_text())


def lock_header(python: str, pip_version: str, torch: str, pins_text: str) -> list[str]:
    """The lock's header: what it is, what it was resolved with, and the deliberate pins with their reasons."""
    return [
        "# qlab's lock: every package `make install` installs, pinned. A pip constraints file: the Makefile",
        "# installs with `-c` on it (LOCK= for your own stack on pyproject.toml's ranges; docs/environment.md).",
        "# torch is not here: it is the machine's (a CUDA build you installed, else the CPU build).",
        "# Generated by `make lock` (python -m qlab.lock); do not edit. Change a pin in one command:",
        '#   make lock PIN="peft==0.21.2"    (sets it in pyproject.toml\'s [tool.qlab.lock], then re-locks)',
        f"# Resolved with: CPython {python} on {sys.platform}, pip {pip_version}, against torch {torch}",
        "# (its dependencies pinned here), qlab[dev,eval] and pyproject.toml's [tool.qlab.lock] pins, which follow.",
        "#",
        *pins_comment(pins_text),
        "",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m qlab.lock", description=__doc__.split("\n")[0])
    ap.add_argument("--pin", action="append", default=[],
                    help="name==version: set it in pyproject.toml's [tool.qlab.lock] pins, then re-lock")
    ap.add_argument("--upgrade", action="store_true",
                    help="ignore the current lock: all but the [tool.qlab.lock] pins to newest")
    ap.add_argument("--torch", default="torch==2.13.0", help="the CPU torch the lock is resolved with (not locked)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter the lock is for")
    args = ap.parse_args()
    pyproject = PYPROJECT.read_text()
    pins_text = with_pins(pyproject, args.pin)  # written back only with a lock that resolved
    pins = read_pyproject_pins(pins_text)
    was = read_pins(LOCK.read_text(), LOCK.name) if LOCK.exists() else {}
    held = {} if args.upgrade else {n: v for n, v in was.items() if n not in pins}

    with tempfile.TemporaryDirectory(prefix="qlab-lock-") as tmp:
        work = Path(tmp)
        subprocess.run([args.python, "-m", "venv", str(work / "venv")], check=True)  # system site-packages off
        py = work / "venv" / "bin" / "python"
        # the resolver is the pip the lock pins (the one `make install` will use), else the newest
        pip = f"pip=={pins.get('pip') or held.get('pip')}" if (pins.get("pip") or held.get("pip")) else "pip"
        done = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--upgrade", pip], stderr=subprocess.PIPE,
                              text=True)
        if done.returncode:
            sys.exit(f"lock: installing {pip} into the throwaway venv failed:\n{done.stderr[-3000:]}")
        report = resolve(py, args.torch, {**held, **pins}, work)
        if report is None and held:
            print(f"lock: the current pins no longer fit together; re-resolving from {PINS_AT} alone",
                  file=sys.stderr)
            report = resolve(py, args.torch, pins, work)
        if report is None:
            sys.exit(f"lock: pip found no set that satisfies pyproject.toml's dependencies and {PINS_AT} (above)")
        python = subprocess.run([str(py), "-c", "import platform; print(platform.python_version())"],
                                capture_output=True, text=True, check=True).stdout.strip()
        pip_version = subprocess.run([str(py), "-m", "pip", "--version"], capture_output=True, text=True,
                                     check=True).stdout.split()[1]

    qlab = next(i for i in report["install"] if canonical(i["metadata"]["name"]) == "qlab")
    direct = {canonical(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0]) for r in qlab["metadata"]["requires_dist"]}
    locked = {}
    for item in report["install"]:
        name, version = canonical(item["metadata"]["name"]), item["metadata"]["version"]
        if name != "qlab" and (name in direct - {"torch"} or not MACHINE.match(name)):
            locked[name] = version
    torch = next((i["metadata"]["version"] for i in report["install"] if canonical(i["metadata"]["name"]) == "torch"),
                 "?")
    off = {n: (v, locked.get(n)) for n, v in pins.items() if locked.get(n) != v}
    if off:
        sys.exit(f"lock: {PINS_AT} pin what the install does not pull or pulls otherwise: {off}")
    header = lock_header(python, pip_version, torch, pins_text)
    if pins_text != pyproject:
        PYPROJECT.write_text(pins_text)
    LOCK.write_text("\n".join(header) + "".join(f"{n}=={v}\n" for n, v in sorted(locked.items())))
    for n in sorted(set(was) | set(locked)):
        if was.get(n) != locked.get(n):
            print(f"  {n}: {was.get(n, '-')} -> {locked.get(n, '-')}")
    print(f"lock: {len(locked)} packages pinned in {LOCK.name}")


if __name__ == "__main__":
    main()
