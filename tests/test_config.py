import pytest

from qlab.config import ConfigError, PrunedCombination, validate


def test_default_config_composes_and_validates(compose):
    cfg = compose()
    validate(cfg)
    assert cfg.quant.type == "nf4" and cfg.adapter.targets == "all_linear"
    assert cfg.optim.name == "paged_adamw_32bit" and cfg.model.preset == "tiny-llama"


@pytest.mark.parametrize("overrides, key", [
    (["quant.type=nf5"], "quant.type"),
    (["quant=int8", "quant.double_quant=true"], "quant.double_quant"),
    (["quant=bf16", "quant.double_quant=true"], "quant.double_quant"),
    (["adapter.r=0"], "adapter.r"),
    (["adapter.r=-4"], "adapter.r"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=-1e-4"], "optim.lr"),
    (["optim.name=sgd"], "optim.name"),
    (["train.steps=0"], "train.steps"),
    (["train.warmup_steps=6"], "train.warmup_steps"),
    (["data.train_file=/nonexistent/train.jsonl"], "data.train_file"),
    (["data.eval_file=missing.jsonl"], "data.eval_file"),
    (["model.name_or_path=/nonexistent/model"], "model.name_or_path"),
    (["model.name_or_path=./no/such/dir"], "model.name_or_path"),
    (["model.name_or_path=not-a-hub-id-or-dir"], "model.name_or_path"),
    (["model.preset=gpt-17"], "model.preset"),
    (["train.max_device_memory_gib=0"], "train.max_device_memory_gib"),
    (["model=base-tiny", "model.base=huge"], "model.base"),
    (["model=smollm2-135m", "model.gguf=llama-7b"], "model.gguf"),
    (["model=smollm2-135m", "model.name_or_path=/tmp"], "model.gguf"),
    (["data.source=wikipedia", "data.train_file=null", "data.eval_file=null"], "data.source"),
    (["data=chitchat", "data.train_file=qlab/assets/chat/train.jsonl"], "data.train_file"),
    (["data=chitchat", "data.eval_file=qlab/assets/chat/eval.jsonl"], "data.eval_file"),
    (["data.train_file=null"], "data.train_file"),
])
def test_bad_config_names_its_key(compose, overrides, key):
    with pytest.raises(ConfigError) as e:
        validate(compose(*overrides))
    assert e.value.key == key and str(e.value).startswith(f"{key}: ")


def test_double_quant_on_16bit_is_a_prunable_combination(compose):
    with pytest.raises(PrunedCombination):
        validate(compose("quant=bf16", "quant.double_quant=true"))
    validate(compose("quant=fp4", "quant.double_quant=true"))


def test_inductor_on_a_cpu_4bit_model_is_a_prunable_combination(compose):
    """Compiled layers fail on bitsandbytes' CPU 4-bit kernel under inductor: pruned (a sweep
    records it with the reason) before anything loads; aot_eager, 16-bit weights or a GPU run."""
    for quant in ("nf4", "fp4"):
        with pytest.raises(PrunedCombination, match="speed.compile: inductor cannot compile"):
            validate(compose(f"quant={quant}", "speed.compile=layers"))
    validate(compose("speed.compile=layers", "speed.compile_backend=aot_eager"))
    validate(compose("speed.compile=layers", "quant=bf16"))
    validate(compose("speed=fast", "train.device=cuda"))


def test_cuda_graphs_are_a_mode_of_inductors_compiled_layers_on_a_gpu(compose):
    """speed.compile_mode: inductor's, for compiled layers only; CUDA graphs on a CPU are pruned."""
    validate(compose("+arm=graphs", "train.device=cuda"))
    with pytest.raises(PrunedCombination, match="speed.compile_mode: CUDA graphs"):
        validate(compose("+arm=graphs", "quant=bf16", "train.device=cpu"))
    for wrong in (["speed.compile=none"], ["speed.compile_backend=aot_eager"]):
        with pytest.raises(ConfigError, match="speed.compile_mode: a torch.compile mode is inductor's"):
            validate(compose("+arm=graphs", "train.device=cuda", *wrong))
    with pytest.raises(ConfigError, match="speed.compile_mode"):
        validate(compose("speed=fast", "train.device=cuda", "speed.compile_mode=max-autotune"))


def test_schema_rejects_wrong_types_at_compose_time(compose):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="adapter.r"):
        compose("adapter.r=abc")


def test_quant_settings_are_spelled_as_the_report_labels_them():
    from qlab.results import frame
    from qlab.config import QUANT_SETTINGS, QUANT_TYPES

    assert all(frame.quant_label({"type": t, "double_quant": dq}) == label for label, (t, dq) in QUANT_SETTINGS.items())
    assert {t for t, _ in QUANT_SETTINGS.values()} == set(QUANT_TYPES) - {"int4"}  # int4: HQQ's, no bnb label


@pytest.mark.parametrize("quant", [["quant=nf4"], ["quant=fp4", "quant.double_quant=true"], ["quant=int8"]])
def test_full_fine_tuning_of_a_quantized_base_is_refused_naming_both_keys(compose, quant):
    # a sweep prunes it (adapter=full beside 4-bit arms), a single run refuses it (a ConfigError)
    with pytest.raises(PrunedCombination) as e:
        validate(compose("adapter=full", *quant))
    assert e.value.key == "adapter.targets" and "quant.type=bf16" in str(e.value)
    assert f"quant.type={quant[0].split('=')[1]}" in str(e.value)
    validate(compose("adapter=full", "quant=bf16"))


def test_real_models_and_data_are_named_not_pathed(compose):
    """model=smollm2-135m / gemma3-270m and data=chitchat validate from the config alone (names
    from conf/shapes.yaml and config.DATA_SOURCES): no machine path is in the config, so none
    enters a run id; the architecture is known for the packing check before anything loads."""
    from qlab import config

    for name, arch in (("smollm2-135m", "llama"), ("gemma3-270m", "gemma3_text")):
        cfg = compose(f"model={name}", "data=chitchat", "data.pack=true")
        validate(cfg)
        assert cfg.model.gguf == name and config.architecture(cfg.model) == arch
        assert cfg.data.source == "chitchat" and cfg.data.train_file is None and cfg.data.eval_file is None


# (overrides, the key the error names, other keys it must name, pruned: a sweep skips it)
BACKEND_COMBINATIONS = [
    (["quant=hqq", "quant.type=nf4"], "quant.type", ["quant.backend=hqq"], False),
    (["quant=nf4", "quant.type=int4"], "quant.type", ["quant.backend=bitsandbytes"], False),
    (["quant=torchao-nf4", "quant.double_quant=false"], "quant.double_quant", ["quant.backend=torchao"], False),
    (["quant=hqq", "quant.double_quant=true"], "quant.double_quant", ["quant.type=int4"], True),
    (["quant=bf16", "quant.backend=hqq"], "quant.backend", ["quant.type=bf16"], True),
    (["quant=int8", "quant.blocksize=128"], "quant.blocksize", ["quant.type=int8"], True),
    (["quant=nf4", "quant.blocksize=48"], "quant.blocksize", [], False),
    (["quant.backend=gptq"], "quant.backend", [], False),
    (["adapter.init=olora"], "adapter.init", [], False),
    (["quant=hqq", "adapter.init=loftq"], "adapter.init", ["quant.type=int4", "quant.backend=hqq"], False),
    (["quant=bf16", "adapter.init=loftq"], "adapter.init", ["quant.type=bf16"], False),
    (["quant=nf4", "adapter.init=loftq", "adapter.dora=true"], "adapter.dora", ["adapter.init=loftq"], False),
    (["quant=nf4", "adapter.init=pissa"], "adapter.init", ["quant.type=nf4", "quant=bf16"], False),
    (["quant=bf16", "adapter.init=pissa", "adapter.dora=true"], "adapter.dora", ["adapter.init=pissa"], False),
    (["quant=torchao-nf4", "adapter.dora=true"], "adapter.dora", ["quant.backend=torchao"], False),
    (["quant=bf16", "adapter=full", "adapter.dora=true"], "adapter.dora", [], True),
]


@pytest.mark.parametrize("overrides, key, named, pruned", BACKEND_COMBINATIONS)
def test_unsupported_backend_and_adapter_combinations_name_both_keys(compose, overrides, key, named, pruned):
    with pytest.raises(ConfigError) as e:
        validate(compose(*overrides))
    assert e.value.key == key and str(e.value).startswith(f"{key}: ")
    assert all(n in str(e.value) for n in named), str(e.value)
    assert isinstance(e.value, PrunedCombination) == pruned


@pytest.mark.parametrize("overrides", [["quant=hqq"], ["quant=hqq", "quant.blocksize=128"], ["quant=torchao-nf4"],
                                       ["quant=nf4", "quant.double_quant=true", "quant.blocksize=32"],
                                       ["quant=nf4", "adapter.init=loftq"], ["quant=fp4", "adapter.init=loftq"],
                                       ["quant=bf16", "adapter.init=pissa"], ["quant=hqq", "adapter.dora=true"],
                                       ["quant=int8", "adapter.dora=true"]])
def test_supported_backend_and_adapter_settings_validate(compose, overrides):
    validate(compose(*overrides))


def test_quant_label_spells_backend_and_block_size():
    from qlab.config import quant_label

    assert quant_label({"type": "nf4", "double_quant": True}) == "nf4+DQ"  # a result from before the keys
    assert quant_label({"type": "nf4", "double_quant": True, "backend": "bitsandbytes", "blocksize": 64}) == "nf4+DQ"
    assert quant_label({"type": "nf4", "double_quant": True, "backend": "bitsandbytes", "blocksize": 128}) == "nf4+DQ/b128"
    assert quant_label({"type": "int4", "backend": "hqq", "blocksize": 64}) == "hqq int4"
    assert quant_label({"type": "nf4", "double_quant": True, "backend": "torchao", "blocksize": 32}) == "torchao nf4+DQ/b32"
    assert quant_label({"type": "bf16", "blocksize": 64}) == "bf16"
