"""Write constraints/lock.txt: every package `make install` installs, pinned, torch excluded.

    python3 constraints/lock.py                          # re-lock: current pins kept where they still fit
    python3 constraints/lock.py --pin transformers==5.18.0 --pin peft==0.21.2
    python3 constraints/lock.py --upgrade                # everything not in pins.txt to its newest

`make lock [PIN="name==version ..."] [UPGRADE=1]` runs this. It resolves in a throwaway venv (system
site-packages off, so nothing this machine happens to have leaks in) with pip's own resolver
(`pip install --dry-run --ignore-installed --report`): the same pip, configuration, index and
interpreter that `make install` then installs with, and nothing is installed. The resolution asks
for qlab[dev,eval], pip itself, and the CPU torch (`--torch`, the Makefile's CPU_TORCH) so that
torch's own dependencies are pinned too; torch and what only a CUDA torch brings (nvidia-*,
triton) are then left out: torch is the machine's. Constraints in: constraints/pins.txt (the
deliberate pins, with reasons) and, unless --upgrade, the current lock's pins (so a re-lock moves
only what it must); when the current pins no longer fit, it re-resolves from pins.txt alone and
says so. Standard library only: it runs before any venv exists.
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints" / "lock.txt"
PINS = ROOT / "constraints" / "pins.txt"
# the machine's torch and what a CUDA torch brings (cuda-toolkit, cuda-bindings, nvidia-*-cu13, triton);
# a package qlab itself requires (nvidia-ml-py) stays
MACHINE = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*(#.*)?$")


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


def with_pins(text: str, specs: list[str]) -> str:
    """pins.txt's text with each `name==version` replaced (or appended), every other line and comment kept."""
    lines = text.splitlines()
    for spec in specs:
        m = PIN.match(spec.strip())
        if not m:
            sys.exit(f"--pin {spec!r}: give name==version")
        name, line = canonical(m[1]), f"{m[1]}=={m[2]}"
        at = [i for i, l in enumerate(lines) if (p := PIN.match(l.strip())) and canonical(p[1]) == name]
        if at:
            comment = PIN.match(lines[at[0]].strip())[3]
            lines[at[0]] = line + (f"  {comment}" if comment else "")
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pin", action="append", default=[], help="name==version: set it in pins.txt, then re-lock")
    ap.add_argument("--upgrade", action="store_true", help="ignore the current lock: all but pins.txt to newest")
    ap.add_argument("--torch", default="torch==2.13.0", help="the CPU torch the lock is resolved with (not locked)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter the lock is for")
    args = ap.parse_args()
    pins_text = with_pins(PINS.read_text(), args.pin)  # written back only with a lock that resolved
    pins = read_pins(pins_text, "constraints/pins.txt")
    was = read_pins(LOCK.read_text(), "constraints/lock.txt") if LOCK.exists() else {}
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
            print("lock: the current pins no longer fit together; re-resolving from constraints/pins.txt alone",
                  file=sys.stderr)
            report = resolve(py, args.torch, pins, work)
        if report is None:
            sys.exit("lock: pip found no set that satisfies pyproject.toml and constraints/pins.txt (above)")
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
        sys.exit(f"lock: pins.txt pins what the install does not pull or pulls otherwise: {off}")
    header = [
        "# qlab's lock: every package `make install` installs, pinned. A pip constraints file: the Makefile",
        "# installs with `-c` on it (LOCK= for your own stack on pyproject.toml's ranges; docs/environment.md).",
        "# torch is not here: it is the machine's (a CUDA build you installed, else the CPU build).",
        "# Generated by `make lock` (constraints/lock.py); do not edit. Change a pin in one command:",
        '#   make lock PIN="peft==0.21.2"    (sets it in constraints/pins.txt, then re-locks)',
        f"# Resolved with: CPython {python} on {sys.platform}, pip {pip_version}, against torch {torch}",
        "# (its dependencies pinned here), qlab[dev,eval] and constraints/pins.txt, which follows.",
        "#",
        *(l if l.startswith("#") else f"#   {l}" for l in pins_text.splitlines() if l.strip()),
        "",
    ]
    PINS.write_text(pins_text)
    LOCK.write_text("\n".join(header) + "".join(f"{n}=={v}\n" for n, v in sorted(locked.items())))
    for n in sorted(set(was) | set(locked)):
        if was.get(n) != locked.get(n):
            print(f"  {n}: {was.get(n, '-')} -> {locked.get(n, '-')}")
    print(f"lock: {len(locked)} packages pinned in {LOCK.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
