"""qlab/results/store.py: run ids, identity across schema growth, publishing, the Result record."""

import json
import os
import shutil
from dataclasses import asdict, fields

import pytest
from omegaconf import OmegaConf

from qlab.results import store


def test_run_id_is_stable_and_ignores_tracker_settings(compose, tmp_path):
    a = compose("quant=fp4")
    assert store.run_id(a) == store.run_id(compose("quant=fp4"))
    assert store.run_id(a).startswith("tiny-llama_fp4_paged_adamw_32bit_all_linear_s0_")
    # where results go and how a run reports progress do not change what it measures
    same = compose("quant=fp4", f"tracker.results_dir={tmp_path / 'elsewhere'}", "tracker.sweep=x",
                   "train.progress=true", "train.save_adapter=false", "tracker.wandb=true")
    assert store.run_id(same) == store.run_id(a)
    for other in ("optim.lr=1e-3", "seed=1", "quant.double_quant=true", "train.runner=hf_trainer"):
        assert store.run_id(compose("quant=fp4", other)) != store.run_id(a), other


def test_a_generate_run_is_identified_by_what_it_reads(compose, tmp_path):
    gen = compose("task=generate")
    assert store.run_id(gen).startswith("tiny-llama_nf4_none_")
    # training settings do not enter a generation run's id; the device and the bench do
    assert store.run_id(compose("task=generate", "optim.lr=1e-3", "adapter.r=4")) == store.run_id(gen)
    assert store.run_id(compose("task=generate", "generate.new_tokens=3")) != store.run_id(gen)


def test_an_adapter_is_identified_by_its_weights_not_its_path(compose, tmp_path):
    for name in ("one", "two"):
        (tmp_path / name / "adapter").mkdir(parents=True)
        (tmp_path / name / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    one, two = (compose("task=generate", f"generate.adapter_run={tmp_path / n}") for n in ("one", "two"))
    assert store.run_id(one) == store.run_id(two) and "_lora_" in store.run_id(one)
    (tmp_path / "two" / "adapter" / "adapter_model.safetensors").write_bytes(b"retrained")
    assert store.run_id(two) != store.run_id(one)


def _complete(directory, config, status="ok", kind=None):
    directory.mkdir(parents=True)
    record = {"status": status, "config": config, "metrics": {}}
    if kind:
        record["kind"] = kind
    (directory / store.RESULT).write_text(json.dumps(record))


def test_a_result_made_before_a_key_existed_is_still_complete(compose):
    cfg = compose()
    assert store.complete_result(cfg) is None
    old = OmegaConf.to_container(cfg, resolve=True)
    for key in ("task", "generate"):  # keys the schema gained after the result was written
        old.pop(key)
    old["train"].pop("runner")
    earlier = store.run_dir(cfg).parent / "made-before-task-existed"
    _complete(earlier, old)
    assert store.complete_result(cfg) == earlier
    # ... but not once an added key holds a value other than its neutral one
    assert store.complete_result(compose("train.runner=hf_trainer")) is None


def test_only_ok_and_oom_are_complete_and_a_failure_never_replaces_them(compose):
    cfg = compose()
    final, staging = store.run_dir(cfg), store.staging_dir(cfg)
    _complete(final, OmegaConf.to_container(cfg, resolve=True), status="failed")
    assert not store.is_complete(final) and store.complete_result(cfg) is None
    shutil.rmtree(final)
    _complete(final, OmegaConf.to_container(cfg, resolve=True), status="oom")
    assert store.is_complete(final)
    _complete(staging, {}, status="failed")
    with pytest.warns(UserWarning, match="keeping the earlier complete result"):
        assert store.publish(staging, final, "failed") == staging
    assert store.read_result(final)["status"] == "oom"
    shutil.rmtree(staging)
    _complete(staging, {"new": True})
    assert store.publish(staging, final, "ok") == final  # a complete attempt replaces the old result
    assert store.read_result(final)["config"] == {"new": True} and not staging.exists()


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "r.json"
    store.atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):  # a tuple key fails half-way through the dump
        store.atomic_write_json(path, {"b": 2, (1, 2): 3})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left
    assert oct(os.stat(path).st_mode)[-3:] == "644"


def test_the_recorder_writes_a_typed_result_and_publishes_it(compose):
    cfg = compose()
    recorder = store.RunRecorder(cfg)
    recorder.start()
    recorder.log_step({"step": 0, "loss": 1.5})
    result = recorder.finish("ok", {"tokens_per_s": 10.0})
    on_disk = store.read_result(store.run_dir(cfg))
    assert on_disk == json.loads(json.dumps(asdict(result)))
    assert set(on_disk) == {f.name for f in fields(store.Result)}
    assert on_disk["schema"] == store.SCHEMA and on_disk["kind"] == "train" and on_disk["run_id"] == recorder.id
    assert on_disk["axes"] == {"model": "tiny-llama", "quant": "nf4", "double_quant": False,
                               "optim": "paged_adamw_32bit", "adapter": "all_linear", "seed": 0, "speed": "recipe"}
    assert (store.run_dir(cfg) / "metrics.jsonl").read_text() == '{"step": 0, "loss": 1.5}\n'
    assert not store.staging_dir(cfg).exists()


def test_a_lost_run_is_recorded_as_failed(compose):
    cfg = compose()
    result = store.record_lost_run(cfg, "killed")
    assert result.status == "failed" and result.error["type"] == "LostRun"
    assert store.read_result(store.run_dir(cfg))["error"]["message"] == "killed"


def test_peak_bytes_prefers_the_device_level_reading():
    assert store.peak_bytes({"rss_peak_bytes": 3, "peak_allocated_bytes": 2, "nvml_peak_device_used_bytes": 5}) \
        == (5.0, "NVML device used")
    assert store.peak_bytes({"rss_peak_bytes": 3, "peak_allocated_bytes": 2, "nvml_peak_device_used_bytes": None}) \
        == (2.0, "torch peak allocated")
    assert store.peak_bytes({"rss_peak_bytes": 3}) == (3.0, "process RSS")
    assert store.peak_bytes({}) == (None, None)


def test_files_sha256_follows_content_and_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 10)
    b.write_bytes(b"y")
    assert store.files_sha256([a, b]) == store.files_sha256([a, b]) != store.files_sha256([b, a])


def test_machine_line_and_slug():
    env = {"gpu": "NVIDIA H200", "torch": "2.11.0", "transformers": "5.17.0", "peft": "0.21.0",
           "bitsandbytes": "0.50.2", "cuda": "13.0", "driver": "580.1"}
    assert store.machine_line(env) == ("NVIDIA H200; torch 2.11.0, transformers 5.17.0, peft 0.21.0, "
                                       "bitsandbytes 0.50.2")
    assert store.machine_line(env, with_cuda=True).endswith("CUDA 13.0, driver 580.1")
    assert store.device_slug(env) == "nvidia-h200"
    assert store.device_slug({"gpu": None, "cpu": "AMD EPYC 9B14"}) == "amd-epyc-9b14"


def test_an_evaluation_finds_its_training_run_where_recorded_or_moved(tmp_path):
    def write(d, **r):
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(r))

    write(tmp_path / "real" / "t1", run_id="t1", kind="train")
    ev = {"kind": "eval", "config": {"eval": {"adapter_run": "/another/machine/real/t1"}},
          "metrics": {"adapter_run_id": "t1"}}
    assert store.training_result(ev, tmp_path / "eval" / "e1")["run_id"] == "t1"  # results moved: <root>/real/t1
    recorded = {**ev, "config": {"eval": {"adapter_run": str(tmp_path / "real" / "t1")}}}
    assert store.training_result(recorded, tmp_path / "x" / "y" / "z")["run_id"] == "t1"  # where recorded
    assert store.training_result({**ev, "metrics": {"adapter_run_id": "t2"}}, tmp_path / "eval" / "e1") is None
    assert store.training_result({**ev, "config": {"eval": {}}}, tmp_path / "eval" / "e1") is None  # a base: none
    assert store.training_result({"kind": "train"}, tmp_path / "eval" / "e1") is None
