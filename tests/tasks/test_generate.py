"""`qlab generate-bench` on the tiny LLaMA preset (CPU): one process per configuration, results
with the right schema and token counts, resume, deterministic greedy output, and the report's
generation table (alone and beside training results, in separate groups)."""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest

from qlab import tasks
from qlab.tasks import generate
from qlab.results import report

N, PROMPTS, REPEATS = 4, 2, 2


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A few training steps on the tiny LLaMA preset; the run keeps its adapter."""
    from hydra import compose, initialize_config_dir

    from conftest import FAST, ROOT
    from qlab import config

    config.register()
    results = tmp_path_factory.mktemp("gb-train") / "results"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"tracker.results_dir={results}", *FAST, "train.steps=3",
                                           "data.max_eval_samples=4"])
    assert tasks.single(cfg) == 0
    [result] = results.rglob("result.json")
    return result.parent


@pytest.fixture(scope="module")
def bench(trained_run, tmp_path_factory):
    results = tmp_path_factory.mktemp("gb") / "results"
    argv = ["--run", str(trained_run), "--quants", "nf4,bf16", "--prompts", str(PROMPTS), "--repeats", str(REPEATS),
            "--new-tokens", str(N), "--batch-sizes", "1,2", "--device", "cpu", "--results-dir", str(results)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # one thread per child: a busy 2-core CI box stays fast
        assert generate.main(argv) == 0
    root = results / "generate"
    return root, argv, {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/result.json")}


def test_one_result_per_configuration(bench, trained_run):
    root, _, results = bench
    assert len(results) == 4 and len(list((root / ".logs").glob("tiny-llama_*.log"))) == 4
    pids = {r["metrics"]["pid"] for r in results.values()}  # one process per configuration, none this one
    assert len(pids) == 4 and os.getpid() not in pids and (root / ".logs" / "fork-server.log").exists()
    trained_id = json.loads((trained_run / "result.json").read_text())["run_id"]
    axes = set()
    for rid, r in results.items():
        assert r["schema"] == "qlab.result/1" and r["kind"] == "generate" and r["status"] == "ok", r.get("error")
        assert r["run_id"] == rid and r["sweep"] == "generate" and r["error"] is None
        a = r["axes"]
        assert a["model"] == "tiny-llama" and a["optim"] is None and a["seed"] == 0
        axes.add((a["quant"], a["double_quant"], a["adapter"]))
        m = r["metrics"]
        for key in ("load_time_s", "weight_bytes", "rss_peak_bytes", "ttft_median_s", "ttft_p90_s",
                    "decode_tokens_per_s_b1_median_tok", "decode_tokens_per_s_b2_median_tok",
                    "e2e_tokens_per_s_b1_median_tok", "e2e_tokens_per_s_b2_median_tok", "first_token_b2_median_s"):
            assert m[key] > 0, key
        assert m["ttft_ci95_low_s"] <= m["ttft_mean_s"] <= m["ttft_ci95_high_s"]
        # batch 1: 2 prompts x 2 repeats = 4 calls of 1 x 4 tokens; batch 2: 1 call per repeat of 2 x 4
        assert (m["generate_calls_b1"], m["generated_tokens_b1"], m["decode_tokens_b1"]) == (4, 16, 12)
        assert (m["generate_calls_b2"], m["generated_tokens_b2"], m["decode_tokens_b2"]) == (2, 16, 12)
        assert m["ttft_n"] == PROMPTS * REPEATS and m["decode_tokens_per_s_b1_n"] <= 4
        assert m["greedy_deterministic"] is True and len(m["sample_output_ids"]) == N
        assert r["config"]["bench"] == {**r["config"]["bench"], "new_tokens": N, "batch_sizes": [1, 2],
                                        "prompts": PROMPTS, "repeats": REPEATS}
        assert r["env"]["torch"] and "git_commit" in r
        if a["adapter"] == "lora":
            assert r["config"]["adapter"]["run_id"] == trained_id and m["adapter_params"] > 0
            assert m["adapter_load_time_s"] > 0
        else:
            assert r["config"]["adapter"] is None and "adapter_params" not in m
    assert axes == {("nf4", False, "none"), ("nf4", False, "lora"), ("bf16", False, "none"), ("bf16", False, "lora")}
    w = {(r["axes"]["quant"], r["axes"]["adapter"]): r["metrics"]["weight_bytes"] for r in results.values()}
    assert w["nf4", "none"] < w["bf16", "none"] and w["nf4", "none"] == w["nf4", "lora"]


def test_resume_skips_complete_results(bench, capsys):
    root, argv, results = bench
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/result.json")}
    t0 = time.perf_counter()
    assert generate.main(argv) == 0
    assert time.perf_counter() - t0 < 5  # no process started
    out = capsys.readouterr().out
    assert out.count("skip ") == 4 and "4 skipped" in out
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/result.json")} == before


def test_greedy_generation_is_deterministic_across_processes(bench):
    """The tokens the bench process generated for the first prompt, again in this process."""
    from omegaconf import OmegaConf
    from peft import PeftModel

    from qlab.run import models
    from qlab.tasks.chat import build_prompt_ids

    _, _, results = bench
    for r in (r for r in results.values() if r["axes"]["quant"] == "nf4"):
        cfg = r["config"]
        loaded = models.load(OmegaConf.create(cfg["model"]), OmegaConf.create(cfg["quant"]), "cpu")
        model = loaded.model
        model.config.use_cache = True
        if cfg["adapter"]:
            model = PeftModel.from_pretrained(model, cfg["adapter"]["path"])
        model.eval()
        prompt = build_prompt_ids([], generate.read_prompts(1)[0], loaded.tokenizer, 512)
        assert loaded.tokenizer.decode(prompt).startswith("<s>") and loaded.tokenizer.decode(prompt).endswith("</s>")
        _, new = generate.Generator(model, loaded.tokenizer, "cpu")([prompt], N)
        assert new[0].tolist() == r["metrics"]["sample_output_ids"]


def test_report_writes_the_generation_table(bench):
    root, _, _ = bench
    page = report.build(root, wandb=False)
    t = pd.read_csv(root / "report" / "tables" / "generation.csv")
    assert sorted(zip(t.quant_label, t.adapter)) == [("bf16", "lora"), ("bf16", "none"), ("nf4", "lora"),
                                                     ("nf4", "none")]
    nf4 = t[(t.quant_label == "nf4") & (t.adapter == "none")].iloc[0]
    assert nf4.weights_delta_pct < 0 and nf4.n == 1 and nf4.ttft_ms > 0 and nf4.decode_tok_s_b2 > 0
    assert nf4.decode_tok_s_b1_ci95_low <= nf4.decode_tok_s_b1_ci95_high
    md = (root / "report" / "tables" / "generation.md").read_text()
    for header in ("load (s)", "weights (MiB)", "peak mem (MiB)", "TTFT b1 (ms)", "decode tok/s b1 [95% CI]",
                   "decode tok/s b2 [95% CI]"):
        assert header in md, header
    text = page.read_text()
    assert "## Generation speed and memory per quantization type" in text and "| nf4 " in text
    assert "B (N - 1) / (T_N - T_1)" in text and (root / "report" / "plots" / "generation.png").stat().st_size > 1000
    assert not (root / "report" / "tables" / "quant.md").exists()  # no training tables for generation runs


def test_training_and_generation_results_are_separate_groups(bench, trained_run, tmp_path):
    root, _, _ = bench
    mixed = tmp_path / "mixed"
    shutil.copytree(root, mixed / "generate", ignore=shutil.ignore_patterns("report*", ".logs"))
    shutil.copytree(trained_run, mixed / "adhoc" / trained_run.name)
    page = report.build(mixed, wandb=False)
    runs = pd.read_csv(mixed / "report" / "runs.csv")
    kinds = runs.groupby("group").kind.unique().to_dict()
    assert {k: list(v) for k, v in kinds.items()} == {1: ["train"], 2: ["generate"]}
    text = page.read_text()
    assert "2 comparability groups" in text and "`kind`" in text
    assert "## Group 2: generation · tiny-llama · 4 new tokens" in text
    assert (mixed / "report" / "group-2" / "tables" / "generation.md").exists()
    assert (mixed / "report" / "group-1" / "tables" / "grid.md").exists()
    assert not (mixed / "report" / "group-1" / "tables" / "generation.md").exists()


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(["--quants", "nf5", "--results-dir", str(tmp_path)])
    assert e.value.code == 2 and "unknown quantization 'nf5'" in capsys.readouterr().err
    assert generate.main(["--run", str(tmp_path), "--results-dir", str(tmp_path)]) == 2
    assert "no result.json" in capsys.readouterr().err
    assert generate.parse_quants("NF4+DQ,bf16,nf4+dq") == ["nf4+dq", "bf16"]
    assert generate.batches([[1], [2], [3]], 2) == [[[1], [2]], [[3], [1]]]  # wraps around


def test_fresh_interpreter_path_records_an_oom_and_a_later_failure_keeps_it(tmp_path, monkeypatch):
    """`python -m qlab.generate_bench` with --device auto: the configuration runs in a new
    interpreter (`--one <spec>`, the GPU path); an injected OOM there is a complete `oom` result
    with what was measured until then (exit 0: a result). A failing re-run of the same
    configuration (in this process) goes to .staging and leaves the oom result in place."""
    from conftest import ROOT
    from qlab.results import store

    args = ["--quants", "nf4", "--prompts", "1", "--repeats", "1", "--new-tokens", "2", "--batch-sizes", "1,2",
            "--device", "auto", "--results-dir", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "qlab.tasks.generate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "QLAB_INJECT_FAULT": "oom", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [path] = (tmp_path / "generate").glob("*/result.json")
    r = json.loads(path.read_text())
    assert r["status"] == "oom" and r["error"]["type"] == "OutOfMemoryError" and store.is_complete(path.parent)
    assert r["metrics"]["load_time_s"] > 0 and r["metrics"]["rss_peak_bytes"] > 0
    assert r["metrics"]["generated_tokens_b1"] == 2  # batch 1 finished before batch 2 failed
    assert r["argv"] == ["qlab generate-bench", *args] and "1 oom" in proc.stdout
    ns = argparse.Namespace(run=None, model=None, quants=["nf4"], prompts=1, repeats=1, new_tokens=2,
                            batch_sizes=[1, 2], device="auto", results_dir=tmp_path, sweep="generate", force=True)
    [config] = generate.configurations(ns)
    assert config["id"] == r["run_id"]
    monkeypatch.setenv("QLAB_INJECT_FAULT", "crash")
    with pytest.warns(UserWarning, match="keeping the earlier complete result"):
        assert generate.bench_one(config)["status"] == "failed"
    assert store.read_result(path.parent)["status"] == "oom"
    assert store.read_result(tmp_path / "generate" / ".staging" / config["id"])["status"] == "failed"


def test_the_adapter_is_identified_by_its_weights(trained_run, tmp_path):
    # the same weights under a config listing target_modules in another order: the same id;
    # other weights: another id (a retrained adapter is re-measured)
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    config_path = copy / "adapter" / "adapter_config.json"
    acfg = json.loads(config_path.read_text())
    acfg["target_modules"] = list(reversed(acfg["target_modules"]))
    config_path.write_text(json.dumps(acfg))
    first, second = generate.adapter_config(trained_run), generate.adapter_config(copy)
    assert first["weights_sha256"] == second["weights_sha256"]
    weights = copy / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert generate.adapter_config(copy)["weights_sha256"] != first["weights_sha256"]


def test_two_trainings_of_one_adapter_run_are_two_arms():
    # one run id, retrained (adapters are not committed): the weights' hash keeps them apart
    from qlab.results import frame, tables

    def row(sha):
        return frame._row({"kind": "generate", "status": "ok", "run_id": f"g-{sha}",
                           "axes": {"adapter": "lora", "quant": "nf4", "double_quant": True},
                           "config": {"adapter": {"run_id": "train-run", "weights_sha256": sha}}}, "x")

    runs = pd.DataFrame([row("839b841ac184c32a"), row("f7a5315623914659")])
    assert list(runs.adapter_run) == ["train-run 839b841a", "train-run f7a53156"]
    arms = tables.generation_arms(runs, ())
    assert len(arms) == 2 and list(arms.adapter) == ["lora (train-run 839b841a)", "lora (train-run f7a53156)"]
