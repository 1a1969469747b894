"""qlab.cli, the `qlab` console script: `qlab --help` lists every verb, each verb reaches its
module's main() with the rest of the arguments (and its own usage line names it `qlab VERB`),
the verb's exit status is passed on, and an unknown verb prints the usage and exits 2."""

import subprocess
import sys
import tomllib
import types

import pytest

from conftest import ROOT
from qlab import cli

# the verbs that parse their arguments with argparse (run is Hydra's: checked in a subprocess)
ARGPARSE_VERBS = [v for v in cli.VERBS if v != "run"]


@pytest.fixture(autouse=True)
def keep_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # cli.main rewrites sys.argv: restored after each test


def test_the_console_script_is_cli_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["qlab"] == "qlab.cli:main"


@pytest.mark.parametrize("argv", [[], ["-h"], ["--help"]])
def test_help_lists_every_verb_and_exits_0(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for verb in cli.VERBS:
        assert f"  qlab {verb} " in out, verb


@pytest.mark.parametrize("argv", [["frobnicate"], ["--version"], ["Run"]])
def test_an_unknown_verb_prints_the_usage_and_exits_2(argv, capsys):
    assert cli.main(argv) == 2
    assert "qlab report RESULTS_DIR" in capsys.readouterr().out


def fake_module(monkeypatch, result):
    """A module standing in for a verb's target: records sys.argv as main() sees it."""
    seen = []
    mod = types.ModuleType("qlab_fake_verb")
    mod.main = lambda: seen.append(list(sys.argv)) or result
    monkeypatch.setitem(sys.modules, "qlab_fake_verb", mod)
    return seen


@pytest.mark.parametrize("verb", list(cli.VERBS))
def test_each_verb_dispatches_to_its_target_with_the_rest_of_argv(verb, monkeypatch):
    seen = fake_module(monkeypatch, 0)
    monkeypatch.setitem(cli.VERBS, verb, "qlab_fake_verb:main")
    assert cli.main([verb, "a", "--b=1"]) == 0
    assert seen == [[f"qlab {verb}", "a", "--b=1"]]


@pytest.mark.parametrize("result, code", [(3, 3), (0, 0), (None, 0), ("text", 0)])
def test_the_verbs_exit_status_is_passed_on(result, code, monkeypatch):
    fake_module(monkeypatch, result)
    monkeypatch.setitem(cli.VERBS, "report", "qlab_fake_verb:main")
    assert cli.main(["report"]) == code


@pytest.mark.parametrize("verb", ARGPARSE_VERBS)
def test_each_real_verb_reaches_its_own_parser(verb, capsys):
    """The real targets: `qlab VERB --help` is that module's argparse help, named `qlab VERB`."""
    with pytest.raises(SystemExit) as e:
        cli.main([verb, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: qlab {verb} ")


def test_report_through_the_cli_on_an_empty_directory(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 1
    assert "no result.json under" in capsys.readouterr().err


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qlab.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_as_a_process_help_and_unknown_verb():
    ok = run_cli("--help")
    assert ok.returncode == 0 and all(f"qlab {v} " in ok.stdout for v in cli.VERBS)
    bad = run_cli("nope")
    assert bad.returncode == 2 and "qlab run [hydra overrides]" in bad.stdout


def test_run_verb_reaches_hydra_and_its_exit_2_for_a_bad_key():
    proc = run_cli("run", "quant=nf5")
    # qlab.run's own check of the overrides, before anything loads: exit 2 naming the key
    assert proc.returncode == 2 and "invalid config, nothing was run" in proc.stderr and "quant" in proc.stderr
