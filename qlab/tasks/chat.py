"""`qlab chat`: talk to a base model plus the LoRA adapter a qlab run trained.

    qlab chat results/<sweep>/<run id>                      # interactive, streaming
    qlab chat results/<sweep>/<run id> --prompt "你好" --prompt "How many moons does it have?"
    qlab chat RUN --prompts-file prompts.txt --no-sample     # one prompt per line, greedy
    qlab chat RUN --merge-to merged/                         # adapter merged into a 16-bit base

The base and its quantization default to the run's own (all of it: type, DQ, backend, block size,
compute dtype), so the adapter meets the weights it was trained against; --quant takes any
quantization label (qlab/tasks/quant_labels.py: nf4+DQ, nf4/b128, hqq-int4, torchao-nf4-dq) and
warns where it differs from the run's. The conversation keeps the training format with its
history in every prompt (docs/chat.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from qlab.config import ConfigError, QuantConfig, quant_label, validate_quant
from qlab.results import store
from qlab.run.presets import PRESETS
from qlab.tasks import quant_labels


class ChatError(RuntimeError):
    pass


@dataclass
class Sampling:
    max_new_tokens: int = 250
    top_p: float = 0.75
    temperature: float = 0.35
    repetition_penalty: float = 1.2
    do_sample: bool = True


def read_run(run_dir: Path) -> tuple[dict, Path]:
    """The run's result and its adapter directory, or a ChatError saying what is missing."""
    result, adapter = store.read_result(run_dir), run_dir / "adapter"
    if result is None:
        raise ChatError(f"{run_dir}: no result.json (or not readable JSON); pass the directory of a qlab run")
    if not (adapter / "adapter_config.json").is_file():
        raise ChatError(f"{run_dir}: no saved adapter (adapter/adapter_config.json); the run needs "
                        "train.save_adapter=true and status ok")
    return result, adapter


def build_prompt_ids(history: list[tuple[str, str]], message: str, tokenizer, max_prompt_tokens: int) -> list[int]:
    """`<s> h1 </s> a1 </s> ... message </s>` as ids, dropping the oldest turns to fit."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids + [eos]

    tail = enc(message)
    turns = [enc(h) + enc(a) for h, a in history]
    while turns and 1 + sum(map(len, turns)) + len(tail) > max_prompt_tokens:
        turns.pop(0)  # forget the oldest exchange first
    ids = [bos] + [t for turn in turns for t in turn] + tail
    if len(ids) > max_prompt_tokens:
        ids = [bos] + tail[-(max_prompt_tokens - 1):]  # the message alone is too long: keep its end
    return ids


@dataclass
class Chat:
    model: object
    tokenizer: object
    context: int
    sampling: Sampling
    history: list[tuple[str, str]] = field(default_factory=list)
    last_prompt: str = ""

    def say(self, message: str, stream: bool = False) -> str:
        import torch
        from transformers import TextStreamer

        budget = self.context - self.sampling.max_new_tokens
        ids = build_prompt_ids(self.history, message, self.tokenizer, max(budget, 8))
        self.last_prompt = self.tokenizer.decode(ids)
        inputs = torch.tensor([ids], device=self.model.device)
        kw = dict(max_new_tokens=self.sampling.max_new_tokens, repetition_penalty=self.sampling.repetition_penalty,
                  eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                  do_sample=self.sampling.do_sample)
        if self.sampling.do_sample:
            kw.update(top_p=self.sampling.top_p, temperature=self.sampling.temperature)
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        with torch.no_grad():
            out = self.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                      streamer=streamer, **kw)
        reply = self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
        self.history.append((message, reply))
        return reply


def load_chat(run_dir: Path, model_override: str | None = None, quant: QuantConfig | None = None,
              device: str = "auto", sampling: Sampling | None = None) -> Chat:
    # these import torch: lazy, so `qlab chat --help` starts fast
    from qlab.run import adapters, models
    from qlab.run.device import resolve_device

    result, adapter = read_run(run_dir)
    cfg = OmegaConf.create(result["config"])
    model_cfg = cfg.model
    if model_override:
        preset = model_override if model_override in PRESETS else None
        model_cfg = OmegaConf.create({"name": model_override, "preset": preset, "trust_remote_code": False,
                                      "name_or_path": None if preset else model_override})
    trained_quant = OmegaConf.create(quant_labels.stored(result))  # an older run's: bitsandbytes, block 64
    quant = None if quant is None else OmegaConf.structured(quant)
    if quant is not None and quant_label(quant) != quant_label(trained_quant):
        warnings.warn(f"the adapter was trained on a {quant_label(trained_quant)} base; chatting with "
                      f"{quant_label(quant)} (allowed: the adapter is 16/32-bit, but outputs may differ)")
    loaded = models.load(model_cfg, quant or trained_quant, resolve_device(device))
    check_same_base(adapter, loaded.model)
    model = adapters.load_saved(loaded.model, adapter).eval()
    context = getattr(loaded.model.config, "max_position_embeddings", None) or cfg.data.max_seq_len
    return Chat(model, loaded.tokenizer, context, sampling or Sampling())


def check_same_base(adapter: Path, base) -> None:
    """An adapter only fits the base whose layers it was shaped for: compare the LoRA A/B
    shapes saved in the adapter with the base's layers of the same names."""
    from safetensors import safe_open

    files = list(adapter.glob("adapter_model.safetensors"))
    if not files:
        return
    modules = dict(base.named_modules())
    with safe_open(str(files[0]), "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key:
                continue
            name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            layer = modules.get(name)
            in_features = getattr(layer, "in_features", None)
            if layer is None or in_features != f.get_slice(key).get_shape()[1]:
                config = json.loads((adapter / "adapter_config.json").read_text())
                raise ChatError(
                    f"the adapter in {adapter} was trained on a different base model "
                    f"({config.get('base_model_name_or_path')}): its layer {name!r} "
                    f"{'does not exist' if layer is None else 'has another shape'} in this one")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qlab chat", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a qlab run directory (holds result.json and adapter/)")
    p.add_argument("--prompt", action="append", default=[], help="a user turn (repeatable); no prompt: interactive")
    p.add_argument("--prompts-file", type=Path, help="one user turn per line")
    p.add_argument("--model", help="another base: preset name, local directory or hub id (default: the run's)")
    p.add_argument("--quant", type=quant_labels.parse,
                   help=f"quantization (default: the run's): {quant_labels.CHOICES}")
    p.add_argument("--double-quant", action="store_true", help="with --quant nf4 or fp4: the same as nf4+DQ, fp4+DQ")
    p.add_argument("--device", default="auto")
    d = Sampling()  # the seed document's sampling
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    p.add_argument("--no-sample", action="store_true", help="greedy decoding (deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge-to", type=Path, help="merge the adapter into a 16-bit copy of the base, save it there")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from transformers import set_seed

    set_seed(args.seed)
    quant = None
    if args.quant:
        q = quant_labels.setting(args.quant)
        quant = QuantConfig(**{**q, "double_quant": q["double_quant"] or args.double_quant})
        try:
            validate_quant(OmegaConf.structured(quant))
        except ConfigError as e:
            print(f"qlab chat: {e}", file=sys.stderr)
            return 2
    sampling = Sampling(args.max_new_tokens, args.top_p, args.temperature, args.repetition_penalty, not args.no_sample)
    try:
        if args.merge_to:
            merge(args.run, args.merge_to, args.model, args.device)
            print(f"merged model saved to {args.merge_to}")
            return 0
        chat = load_chat(args.run, args.model, quant, args.device, sampling)
    except (ChatError, ConfigError, OSError) as e:
        print(f"qlab chat: {e}", file=sys.stderr)
        return 2
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [l.strip() for l in args.prompts_file.read_text(encoding="utf-8").splitlines() if l.strip()]
    if prompts:
        for message in prompts:
            print(f"User: {message}\nAssistant: ", end="", flush=True)
            chat.say(message, stream=True)
        return 0
    print("qlab chat: empty line or Ctrl-D to quit")
    while True:
        try:
            message = input("User: ").strip()
        except EOFError:
            break
        if not message:
            break
        print("Assistant: ", end="", flush=True)
        chat.say(message, stream=True)
    return 0


def merge(run_dir: Path, out: Path, model_override: str | None, device: str) -> None:
    """Merge the adapter into the base held in 16 bits (merging into 4-bit weights would
    round the update away) and save the result with its tokenizer."""
    chat = load_chat(run_dir, model_override, QuantConfig(type="bf16"), device, Sampling(do_sample=False))
    merged = chat.model.merge_and_unload()
    merged.save_pretrained(out)
    chat.tokenizer.save_pretrained(out)


if __name__ == "__main__":
    sys.exit(main())
