"""task=generate and `qlab generate-bench` on the tiny LLaMA preset (CPU): one process per
configuration through the one launcher, results with the right schema and token counts, resume
and --force, deterministic greedy output, bad input refused before anything runs, an injected
oom or failure recorded with its peaks, and the report's generation table (alone, beside
training results in separate groups, and from both result layouts)."""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT
from qlab import config, tasks
from qlab.results import report, store
from qlab.tasks import generate

N, PROMPTS, REPEATS = 4, 2, 2
SMALL = ["--prompts", str(PROMPTS), "--repeats", str(REPEATS), "--new-tokens", str(N), "--batch-sizes", "1,2",
         "--device", "cpu"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A few training steps on the tiny LLaMA preset; the run keeps its adapter."""
    from conftest import FAST

    results = tmp_path_factory.mktemp("gb-train") / "results"
    cfg = config.compose([f"tracker.results_dir={results}", *FAST, "train.steps=3", "data.max_eval_samples=4"])
    assert tasks.single(cfg) == 0
    [result] = results.rglob("result.json")
    return result.parent


@pytest.fixture(scope="module")
def bench(trained_run, tmp_path_factory):
    results = tmp_path_factory.mktemp("gb") / "results"
    argv = ["--run", str(trained_run), "--quants", "nf4,bf16", *SMALL, "--results-dir", str(results)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # one thread per run process: a busy 2-core CI box stays fast
        assert generate.main(argv) == 0
    root = results / "generate"
    return root, argv, {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/result.json")}


def test_one_result_per_configuration(bench, trained_run):
    root, _, results = bench
    assert len(results) == 4 and {p.stem for p in (root / ".logs").glob("tiny-llama_*.log")} == set(results)
    pids = {r["metrics"]["pid"] for r in results.values()}  # one process per configuration, none this one
    assert len(pids) == 4 and os.getpid() not in pids
    trained_id = json.loads((trained_run / "result.json").read_text())["run_id"]
    axes = set()
    for rid, r in results.items():
        assert r["schema"] == "qlab.result/1" and r["kind"] == "generate" and r["status"] == "ok", r.get("error")
        assert r["run_id"] == rid and r["sweep"] == "generate" and r["error"] is None
        store.Result(**r)  # the recorder's typed result, field for field
        a = r["axes"]
        assert a["model"] == "tiny-llama" and a["optim"] is None and a["seed"] == 0
        axes.add((a["quant"], a["double_quant"], a["adapter"]))
        m = r["metrics"]
        for key in ("load_time_s", "weight_bytes", "rss_peak_bytes", "ttft_median_s", "ttft_p90_s",
                    "decode_tokens_per_s_b1_median_tok", "decode_tokens_per_s_b2_median_tok",
                    "e2e_tokens_per_s_b1_median_tok", "e2e_tokens_per_s_b2_median_tok", "first_token_b2_median_s",
                    "rss_peak_bytes_b1", "rss_peak_bytes_b2"):
            assert m[key] > 0, key
        # the t-interval of 4 timed calls; none where its lower end would be <= 0 (stats.summarize's rule
        # for a positive quantity), as on a loaded machine
        assert ("ttft_ci95_low_s" in m) == ("ttft_ci95_high_s" in m)
        if "ttft_ci95_low_s" in m:
            assert 0 < m["ttft_ci95_low_s"] <= m["ttft_mean_s"] <= m["ttft_ci95_high_s"]
        else:  # mean - t(0.975, 3) sd / sqrt(4) <= 0: a coefficient of variation of at least 2 / 3.182
            assert m["ttft_cv"] >= 2 / 3.1824 - 1e-6
        # batch 1: 2 prompts x 2 repeats = 4 calls of 1 x 4 tokens; batch 2: 1 call per repeat of 2 x 4
        assert (m["generate_calls_b1"], m["generated_tokens_b1"], m["decode_tokens_b1"]) == (4, 16, 12)
        assert (m["generate_calls_b2"], m["generated_tokens_b2"], m["decode_tokens_b2"]) == (2, 16, 12)
        assert m["ttft_n"] == PROMPTS * REPEATS and m["decode_tokens_per_s_b1_n"] <= 4
        assert m["greedy_deterministic"] is True and len(m["sample_output_ids"]) == N and m["sample_output_text"]
        g = r["config"]["generate"]
        assert (g["new_tokens"], g["batch_sizes"], g["prompts"], g["repeats"]) == (N, [1, 2], PROMPTS, REPEATS)
        assert r["config"]["train"]["device"] == "cpu" and r["config"]["task"] == "generate"
        assert r["env"]["torch"] and "git_commit" in r and "task=generate" in r["argv"]
        if a["adapter"] == "lora":
            assert m["adapter_run_id"] == trained_id and m["adapter_params"] > 0 and m["adapter_load_time_s"] > 0
            assert m["adapter_trained_quant"] == "nf4" and Path(g["adapter_run"]) == trained_run.resolve()
            # the hash the run id holds (store.IDENTITY_FILES) is the one recorded for the report
            assert m["adapter_weights_sha256"] == store.identity(r["config"])["generate"]["adapter_run"]
        else:
            assert g["adapter_run"] is None and "adapter_params" not in m and "adapter_run_id" not in m
    assert axes == {("nf4", False, "none"), ("nf4", False, "lora"), ("bf16", False, "none"), ("bf16", False, "lora")}
    w = {(r["axes"]["quant"], r["axes"]["adapter"]): r["metrics"]["weight_bytes"] for r in results.values()}
    assert w["nf4", "none"] < w["bf16", "none"] and w["nf4", "none"] == w["nf4", "lora"]


def test_resume_skips_complete_results(bench, capsys):
    root, argv, results = bench
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/result.json")}
    t0 = time.perf_counter()
    assert generate.main(argv) == 0
    assert time.perf_counter() - t0 < 5  # no run process started
    out = capsys.readouterr().out
    assert out.count("skip ") == 4 and "4 skipped" in out
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/result.json")} == before


def test_greedy_generation_is_deterministic_across_processes(bench):
    """The tokens the run process generated for the first prompt, again in this process."""
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
        if cfg["generate"]["adapter_run"]:
            model = PeftModel.from_pretrained(model, str(Path(cfg["generate"]["adapter_run"]) / "adapter"))
        model.eval()
        prompt = build_prompt_ids([], generate.read_prompts(1)[0], loaded.tokenizer, 512)
        assert loaded.tokenizer.decode(prompt).startswith("<s>") and loaded.tokenizer.decode(prompt).endswith("</s>")
        _, new = generate.Generator(model, loaded.tokenizer, "cpu")([prompt], N)
        assert new[0].tolist() == r["metrics"]["sample_output_ids"]


def test_report_writes_the_generation_table(bench):
    root, _, _ = bench
    page = report.build(root, wandb=False)
    t = pd.read_csv(root / "report" / "tables" / "generation.csv")
    # one nf4 adapter at both quantizations (named by its training run's targets), compared in one block
    assert sorted(zip(t.quant_label, t.adapter)) == [("bf16", "all_linear, trained on nf4"), ("bf16", "none"),
                                                     ("nf4", "all_linear"), ("nf4", "none")]
    assert t[(t.quant_label == "nf4") & (t.adapter == "all_linear")].iloc[0].weights_delta_pct < 0  # vs its bf16 row
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
    assert "2 prompts (qlab/assets/chat/eval.jsonl, first human turns) x 2 repeats, greedy decoding" in text
    assert "1 untimed warm-up call(s)" in text
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
    with pytest.raises(SystemExit) as e:
        generate.main(["--batch-sizes", "1,x", "--results-dir", str(tmp_path)])
    assert e.value.code == 2 and "integers separated by commas" in capsys.readouterr().err
    assert generate.main(["--run", str(tmp_path), "--results-dir", str(tmp_path)]) == 2
    assert "no result.json" in capsys.readouterr().err
    assert generate.main(["--prompts", "0", "--results-dir", str(tmp_path)]) == 2
    assert "generate.prompts: must be >= 1" in capsys.readouterr().err
    assert generate.main(["--model", "no/such/dir/", "--results-dir", str(tmp_path)]) == 2
    assert "model.name_or_path" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing was run, nothing written
    assert generate.parse_quants("NF4+DQ,bf16,nf4+dq") == ["nf4+dq", "bf16"]
    assert generate.parse_batch_sizes("8,1,8") == [1, 8]
    assert generate.batches([[1], [2], [3]], 2) == [[[1], [2]], [[3], [1]]]  # wraps around


def test_missing_adapter_names_the_key(trained_run, tmp_path, capsys, caplog):
    no_adapter = tmp_path / "run"
    no_adapter.mkdir()
    shutil.copy(trained_run / "result.json", no_adapter)
    assert generate.main(["--run", str(no_adapter), *SMALL, "--results-dir", str(tmp_path / "r")]) == 2
    assert "generate.adapter_run: no adapter/ in" in capsys.readouterr().err
    cfg = config.compose(["task=generate", f"generate.adapter_run={no_adapter}", f"tracker.results_dir={tmp_path}/r"])
    assert tasks.single(cfg) == tasks.EXIT["invalid"] and "generate.adapter_run" in caplog.text
    assert not (tmp_path / "r").exists()


def test_an_adapter_of_another_base_is_refused_before_loading(trained_run, tmp_path, capsys):
    # chat's check (its LoRA shapes against the base's layers) on the base built on the meta device
    assert generate.main(["--run", str(trained_run), "--model", "small-llama", *SMALL,
                          "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "generate.adapter_run" in err and "trained on a different base model" in err
    assert not list(tmp_path.iterdir())


def test_python_m_qlab_run_task_generate_writes_a_valid_result(trained_run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qlab.run", "task=generate", "quant=nf4", "quant.double_quant=true",
                           f"generate.adapter_run={trained_run}", "generate.prompts=1", "generate.repeats=1",
                           "generate.new_tokens=2", "generate.batch_sizes=[1]", "train.device=cpu",
                           f"tracker.results_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [path] = (tmp_path / "adhoc").glob("*/result.json")
    r = json.loads(path.read_text())
    result = store.Result(**r)
    assert result.status == "ok" and result.kind == "generate" and path.parent.name == result.run_id
    assert result.run_id.startswith("tiny-llama_nf4-dq_lora_") and len(result.run_id.rsplit("_", 1)[1]) == 8
    assert result.axes == {"model": "tiny-llama", "quant": "nf4", "double_quant": True, "optim": None,
                           "adapter": "lora", "seed": 0}
    m = result.metrics
    assert m["generated_tokens_b1"] == 2 and m["ttft_n"] == 1 and m["adapter_params"] > 0 and m["wall_time_s"] > 0
    assert (path.parent / "config.yaml").exists() and (path.parent / "metrics.jsonl").exists()


def test_an_injected_oom_is_a_result_with_its_peaks_and_a_failed_rerun_keeps_it(tmp_path, monkeypatch, capsys):
    """An injected OOM in the run process is a complete `oom` result with what was measured until
    then (exit 0: a result). A failing re-run of the same configuration, in this process or
    forced through the bench (exit 1), goes to .staging and leaves the oom result in place."""
    args = ["--quants", "nf4", "--prompts", "1", "--repeats", "1", "--new-tokens", "2", "--batch-sizes", "1,2",
            "--device", "cpu", "--results-dir", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "qlab.tasks.generate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "QLAB_INJECT_FAULT": "oom", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [path] = (tmp_path / "generate").glob("*/result.json")
    r = json.loads(path.read_text())
    assert r["status"] == "oom" and r["error"]["type"] == "OutOfMemoryError" and store.is_complete(path.parent)
    assert r["metrics"]["load_time_s"] > 0 and r["metrics"]["rss_peak_bytes"] > 0  # the failing window's peak
    assert r["metrics"]["generated_tokens_b1"] == 2  # batch 1 finished before batch 2 failed
    assert "1 oom" in proc.stdout
    ns = argparse.Namespace(run=None, model=None, quants=["nf4"], prompts=1, repeats=1, new_tokens=2,
                            batch_sizes=[1, 2], device="cpu", results_dir=tmp_path, sweep="generate", force=True)
    [(_, cfg)] = generate.plan(ns)
    assert store.run_id(cfg) == r["run_id"]
    staging = tmp_path / "generate" / ".staging" / r["run_id"]
    monkeypatch.setenv("QLAB_INJECT_FAULT", "crash")
    with pytest.warns(UserWarning, match="keeping the earlier complete result"):
        assert tasks.execute(cfg).status == "failed"
    assert store.read_result(path.parent)["status"] == "oom" and store.read_result(staging)["status"] == "failed"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert generate.main(args) == 0 and "1 skipped" in capsys.readouterr().out  # complete: an oom is a result
    assert generate.main([*args, "--force"]) == 1 and "1 failed" in capsys.readouterr().out
    failed = store.read_result(staging)
    assert failed["status"] == "failed" and failed["error"]["type"] == "InjectedCrash"
    assert failed["metrics"]["pid"] not in (os.getpid(), r["metrics"]["pid"])  # its own process
    assert store.read_result(path.parent)["status"] == "oom"


def test_the_adapter_is_identified_by_its_weights(trained_run, tmp_path):
    # the same weights under a config listing target_modules in another order: the same id;
    # other weights: another id (a retrained adapter is re-measured)
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    config_path = copy / "adapter" / "adapter_config.json"
    acfg = json.loads(config_path.read_text())
    acfg["target_modules"] = list(reversed(acfg["target_modules"]))
    config_path.write_text(json.dumps(acfg))

    def ids(run):
        cfg = config.compose(["task=generate", f"generate.adapter_run={run}"])
        return store.run_id(cfg), generate.prepare(cfg).adapter_metrics["adapter_weights_sha256"]

    first = ids(trained_run)
    assert ids(copy) == first and first[0] != store.run_id(config.compose(["task=generate"]))
    weights = copy / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    second = ids(copy)
    assert second[0] != first[0] and second[1] != first[1]


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


def test_both_result_layouts_group_and_label_alike():
    """A result of the first bench (`bench`, `adapter` in the config) and one of task=generate
    (`generate`, `train.device`, the adapter in the metrics) of the same measurement: the same
    group settings and the same adapter arm."""
    from omegaconf import OmegaConf

    from qlab.results import frame

    bench = {"prompts": 3, "repeats": 2, "new_tokens": 24, "batch_sizes": [1, 8], "device": "auto",
             "warmup_calls": 1, "decoding": "greedy", "prompt_source": generate.PROTOCOL["prompt_source"]}
    model = {"name": "llama-7b", "name_or_path": None, "preset": "llama-7b", "trust_remote_code": False}
    quant = {"type": "nf4", "double_quant": True, "compute_dtype": "auto"}
    old = {"model": model, "quant": quant, "bench": bench, "seed": 0, "force": False,
           "adapter": {"run_id": "train-run", "weights_sha256": "839b841ac184c32a", "r": 64, "path": "/x"},
           "tracker": {"results_dir": "results", "sweep": "g"}}
    new = OmegaConf.to_container(config.compose([
        "task=generate", "model=llama-7b", "quant=nf4", "quant.double_quant=true", "generate.prompts=3",
        "generate.repeats=2", "generate.new_tokens=24", "generate.adapter_run=/runs/train-run"]), resolve=True)
    metrics = {**generate.PROTOCOL, "adapter_run_id": "train-run", "adapter_weights_sha256": "839b841ac184c32a"}
    rows = [frame._row({"kind": "generate", "status": "ok", "run_id": f"r{i}", "config": c, "metrics": m,
                        "axes": {"adapter": "lora", "quant": "nf4", "double_quant": True, "model": "llama-7b"}}, "x")
            for i, (c, m) in enumerate([(old, {}), (new, metrics)])]
    assert rows[0]["adapter_run"] == rows[1]["adapter_run"] == "train-run 839b841a"
    assert rows[0]["config_rest"] == rows[1]["config_rest"]
    runs = frame.assign_groups(pd.DataFrame(rows))
    assert runs.group.nunique() == 1
    label = runs.group_label.iloc[0]
    assert label.startswith("generation · llama-7b · 24 new tokens · batch 1, 8 · 3 prompts x 2 repeats")


def test_bench_settings_by_label_compose_their_backend_and_block_size(tmp_path):
    """--quants takes any quantization label; one of the six defaults composes what `quant=nf4
    quant.double_quant=true` did, so the bench's earlier results keep their run ids (and resume)."""
    ns = argparse.Namespace(run=None, model=None, quants=generate.parse_quants("nf4+DQ,HQQ-int4,nf4/b128,nf4-dq"),
                            prompts=1, repeats=1, new_tokens=2, batch_sizes=[1], device="cpu", results_dir=tmp_path,
                            sweep="generate", force=False)
    plans = generate.plan(ns)
    assert [(c.quant.type, c.quant.double_quant, c.quant.backend, c.quant.blocksize) for _, c in plans] == [
        ("nf4", True, "bitsandbytes", 64), ("int4", False, "hqq", 64), ("nf4", False, "bitsandbytes", 128)]
    assert [generate.describe(c) for _, c in plans] == [
        "tiny-llama nf4+DQ adapter=none", "tiny-llama hqq int4 adapter=none", "tiny-llama nf4/b128 adapter=none"]
    overrides, cfg = plans[0]
    before = [o for o in overrides if not o.startswith("quant.")] + ["quant=nf4", "quant.double_quant=true"]
    assert store.run_id(cfg) == store.run_id(config.compose(before))
    assert store.run_id(plans[1][1]).startswith("tiny-llama_hqq-int4_none_")


def test_an_adapter_names_the_whole_quantization_it_trained_on():
    def trained_on(quant):
        return generate.trained_by({"run_id": "r", "config": {"quant": quant}})["adapter_trained_quant"]

    assert trained_on({"type": "nf4", "double_quant": True}) == "nf4+DQ"  # a result from before the backend
    assert trained_on({"type": "int4", "double_quant": False, "backend": "hqq", "blocksize": 32}) == "hqq int4/b32"
    assert trained_on({"type": "nf4", "double_quant": True, "backend": "torchao", "blocksize": 64}) == "torchao nf4+DQ"
    assert trained_on(None) == "?"
