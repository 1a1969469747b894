"""Chat with an adapter a real (tiny) run trained: prompts, history, determinism, errors."""

import json
import shutil
import warnings

import pytest

from qlab import tasks
from qlab.tasks import chat
from qlab.config import QuantConfig


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Train a few steps on the tiny LLaMA preset and keep the adapter."""
    from hydra import compose, initialize_config_dir

    from conftest import FAST, ROOT
    from qlab import config

    config.register()
    results = tmp_path_factory.mktemp("chat") / "results"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"tracker.results_dir={results}", *FAST, "train.steps=8"])
    assert tasks.single(cfg) == 0
    [result] = results.rglob("result.json")
    return result.parent


GREEDY = chat.Sampling(max_new_tokens=12, do_sample=False)


def test_two_turns_carry_the_history_and_greedy_is_deterministic(trained_run):
    c = chat.load_chat(trained_run, device="cpu", sampling=GREEDY)
    first = c.say("What colour is the planet Zorba?")
    second = c.say("How many moons does it have?")
    # the prompt of turn two holds turn one, in the training format
    assert c.last_prompt.startswith("<s>What colour is the planet Zorba?</s>")
    p = c.last_prompt
    assert p.index("Zorba?</s>") < p.index(first, p.index("Zorba?</s>")) < p.index("How many moons")
    assert p.endswith("How many moons does it have?</s>")
    assert c.history == [("What colour is the planet Zorba?", first), ("How many moons does it have?", second)]
    again = chat.load_chat(trained_run, device="cpu", sampling=GREEDY)
    assert again.say("What colour is the planet Zorba?") == first


def test_history_is_truncated_from_the_oldest_turn(trained_run):
    c = chat.load_chat(trained_run, device="cpu", sampling=GREEDY)
    tok = c.tokenizer
    history = [("first question " * 20, "first answer"), ("second question", "second answer")]
    full = chat.build_prompt_ids(history, "third", tok, 10_000)
    cut = chat.build_prompt_ids(history, "third", tok, len(full) - 1)
    text = tok.decode(cut)
    assert "first question" not in text and "second question" in text and text.endswith("third</s>")


def test_cli_non_interactive_with_prompts_file(trained_run, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("你好\nCount from 3 to 5.\n", encoding="utf-8")
    assert chat.main([str(trained_run), "--prompts-file", str(prompts), "--no-sample",
                      "--max-new-tokens", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("User: ") == 2 and "User: Count from 3 to 5." in out


def test_missing_adapter_is_a_clear_error(tmp_path, trained_run, capsys):
    assert chat.main([str(tmp_path), "--device", "cpu"]) == 2
    assert "no result.json" in capsys.readouterr().err
    (tmp_path / "result.json").write_text('{"run_id": "cut off')  # a half-written file: the same clear error
    with pytest.raises(chat.ChatError, match="not readable JSON"):
        chat.read_run(tmp_path)
    (tmp_path / "result.json").write_text((trained_run / "result.json").read_text())
    with pytest.raises(chat.ChatError, match="no saved adapter"):
        chat.read_run(tmp_path)


def test_adapter_on_a_different_base_is_an_error(trained_run):
    with pytest.raises(chat.ChatError, match="trained on a different base model"):
        chat.load_chat(trained_run, model_override="tiny-bloom", device="cpu", sampling=GREEDY)


def test_other_quantization_is_allowed_with_a_warning(trained_run):
    with pytest.warns(UserWarning, match="trained on a nf4 base; chatting with fp4"):
        c = chat.load_chat(trained_run, quant=QuantConfig(type="fp4"), device="cpu", sampling=GREEDY)
    assert isinstance(c.say("Hello!"), str)


def test_merge_into_16bit_base(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM

    with pytest.warns(UserWarning):  # merging uses the 16-bit base, not the trained nf4 one
        chat.merge(trained_run, tmp_path / "merged", None, "cpu")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "llama"


def copy_run(trained_run, directory, **quant):
    """The run's result.json and adapter/ in `directory`, its stored quant config changed by `quant`
    (a key set to None is left out, as a result from before it stored it)."""
    shutil.copytree(trained_run / "adapter", directory / "adapter")
    result = json.loads((trained_run / "result.json").read_text())
    q = {**result["config"]["quant"], **quant}
    result["config"]["quant"] = {k: v for k, v in q.items() if v is not None}
    (directory / "result.json").write_text(json.dumps(result))
    return directory


def layer_types(c) -> set[str]:
    return {type(m).__name__ for m in c.model.modules()} & {"Linear4bit", "HQQLinear", "Linear8bitLt"}


def test_the_run_s_backend_is_the_default_base(trained_run, tmp_path):
    """The base as the run trained it, backend and block size included: a run stored as HQQ loads HQQ
    (the adapter's shapes fit any backend); one from before quant.backend loads bitsandbytes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*trained on a")  # its own quantization: no warning
        hqq = chat.load_chat(copy_run(trained_run, tmp_path / "hqq", type="int4", double_quant=False, backend="hqq",
                                      blocksize=32), device="cpu", sampling=GREEDY)
        old = chat.load_chat(copy_run(trained_run, tmp_path / "old", backend=None, blocksize=None), device="cpu",
                             sampling=GREEDY)
    assert layer_types(hqq) == {"HQQLinear"} and layer_types(old) == {"Linear4bit"}
    assert isinstance(hqq.say("Hello!"), str)
    with pytest.warns(UserWarning, match=r"trained on a hqq int4/b32 base; chatting with nf4\+DQ/b32"):
        other = chat.load_chat(tmp_path / "hqq", quant=QuantConfig(type="nf4", double_quant=True, blocksize=32),
                               device="cpu", sampling=GREEDY)
    assert layer_types(other) == {"Linear4bit"}


def test_quant_flag_takes_labels_and_refuses_a_bad_combination_before_loading(trained_run, capsys, monkeypatch):
    def refused(*a, **k):
        raise AssertionError("loaded a model for a refused --quant")

    monkeypatch.setattr(chat, "load_chat", refused)
    assert chat.main([str(trained_run), "--quant", "hqq-int4", "--double-quant", "--device", "cpu"]) == 2
    assert "quant.double_quant" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        chat.main([str(trained_run), "--quant", "nf5"])
    assert e.value.code == 2 and "unknown quantization 'nf5'" in capsys.readouterr().err
