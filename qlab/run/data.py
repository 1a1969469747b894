"""Multi-turn chat data with the loss on the assistant's tokens only.

A conversation becomes `<s> human1 </s> assistant1 </s> human2 </s> ...`; labels copy each reply
and the </s> that closes it (the model must learn to stop), -100 elsewhere. Each utterance is
tokenized on its own, so no merge crosses a turn boundary. Files are JSONL (MOSS/Firefly
conversations or alpaca records). Training batches are padded, or (data.pack) padding-free rows
whose position_ids restart per conversation (docs/running.md#data); evaluation stays padded.
"""

from __future__ import annotations

import importlib
import json
import random
from dataclasses import dataclass, field
from typing import Iterator

from qlab.config import DATA_SOURCES, resolve_path

IGNORE_INDEX = -100
Conversation = list[tuple[str, str]]  # [(human, assistant), ...]


class DataError(ValueError):
    """A malformed data file; the message names the file and line."""


def _parse(obj, fmt: str) -> Conversation:
    if not isinstance(obj, dict):
        raise ValueError("a line must hold a JSON object")
    if fmt in ("auto", "conversation") and "conversation" in obj:
        turns = obj["conversation"]
        if not isinstance(turns, list) or not turns:
            raise ValueError("'conversation' must be a non-empty list of turns")
        out = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or not all(isinstance(turn.get(k), str) for k in ("human", "assistant")):
                raise ValueError(f"turn {i} needs string fields 'human' and 'assistant'")
            out.append((turn["human"], turn["assistant"]))
        return out
    if fmt in ("auto", "alpaca") and "instruction" in obj:
        inst, inp, output = obj.get("instruction"), obj.get("input", ""), obj.get("output")
        if not all(isinstance(v, str) for v in (inst, inp, output)):
            raise ValueError("'instruction', 'input' and 'output' must be strings")
        return [(f"{inst}\n{inp}" if inp else inst, output)]
    expected = {"auto": "'conversation' or 'instruction'", "conversation": "'conversation'",
                "alpaca": "'instruction'"}[fmt]
    raise ValueError(f"no {expected} field (data.format={fmt})")


def load_conversations(path: str, fmt: str = "auto", on_bad_line: str = "error") -> tuple[list[Conversation], int]:
    """Read a JSONL file. Returns (conversations, number of bad lines skipped)."""
    convs, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                convs.append(_parse(json.loads(line), fmt))
            except (ValueError, json.JSONDecodeError) as e:
                if on_bad_line == "skip":
                    skipped += 1
                    continue
                raise DataError(f"{path}:{lineno}: {e} (set data.on_bad_line=skip to skip such lines)") from None
    if not convs:
        raise DataError(f"{path}: no usable records")
    return convs, skipped


def encode(conv: Conversation, tokenizer, max_seq_len: int) -> tuple[list[int], list[int]] | None:
    """Token ids and labels for one conversation, truncated to max_seq_len from the end.
    Returns None when truncation leaves no target token (the caller drops and counts it)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    ids, labels = [bos], [IGNORE_INDEX]
    for human, assistant in conv:
        h = tokenizer(human, add_special_tokens=False).input_ids + [eos]
        a = tokenizer(assistant, add_special_tokens=False).input_ids + [eos]
        ids += h + a
        labels += [IGNORE_INDEX] * len(h) + a
        if len(ids) >= max_seq_len:
            break
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return ids, labels


@dataclass
class Split:
    samples: list[tuple[list[int], list[int]]]
    dropped_no_target: int = 0  # truncated to zero assistant tokens


@dataclass
class RawData:
    """Parsed (not yet tokenized) files: read before any model loads, so a bad line fails fast."""

    train: list[Conversation]
    eval: list[Conversation] | None
    skipped_bad_lines: int


def files(data_cfg) -> tuple[str, str | None]:
    """(train file, eval file or None): data.train_file / eval_file, or those data.source builds on
    first use into $QLAB_CACHE (config.DATA_SOURCES), so the config never names a machine's path.
    A source that cannot be built (its wheel absent) is a DataError saying how to install it."""
    source = data_cfg.get("source")
    if source is None:
        return resolve_path(data_cfg.train_file), resolve_path(data_cfg.eval_file) if data_cfg.eval_file else None
    try:
        train, ev = importlib.import_module(DATA_SOURCES[source]).build()
    except RuntimeError as e:  # e.g. ChitchatError: not installed, or not the recorded bytes
        raise DataError(f"data.source={source}: {e}") from None
    return str(train), str(ev)


def read(data_cfg) -> RawData:
    train_file, eval_file = files(data_cfg)
    train, skipped = load_conversations(train_file, data_cfg.format, data_cfg.on_bad_line)
    ev = None
    if eval_file:
        ev, skipped_eval = load_conversations(eval_file, data_cfg.format, data_cfg.on_bad_line)
        ev, skipped = ev[: data_cfg.max_eval_samples], skipped + skipped_eval
    return RawData(train, ev, skipped)


def tokenize_split(convs: list[Conversation], tokenizer, max_seq_len: int, name: str) -> Split:
    encoded = [encode(conv, tokenizer, max_seq_len) for conv in convs]
    samples = [e for e in encoded if e is not None]
    if not samples:
        raise DataError(f"{name}: every sample lost its target tokens at data.max_seq_len={max_seq_len}")
    return Split(samples, len(encoded) - len(samples))


def collate(samples, pad_id: int, pad_to: int | None = None) -> dict:
    """Right-pad a list of (ids, labels) into tensors; pad_to fixes the length (else longest)."""
    import torch

    length = pad_to or max(len(ids) for ids, _ in samples)
    n = len(samples)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, (ids, lab) in enumerate(samples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def pack(samples) -> dict:
    """One row [1, sum of lengths]: the conversations end to end, position_ids restarting at 0
    at each, and deliberately no attention_mask (from which transformers detects the packing)."""
    import torch

    row = lambda values: torch.tensor([[v for seq in values for v in seq]], dtype=torch.long)  # noqa: E731
    return {"input_ids": row(ids for ids, _ in samples), "labels": row(lab for _, lab in samples),
            "position_ids": row(range(len(ids)) for ids, _ in samples)}


@dataclass
class Data:
    train: Split
    eval: Split | None
    batch_size: int
    pad_id: int
    pad_to: int | None
    seed: int
    stats: dict = field(default_factory=dict)
    pack_tokens: int | None = None  # packed rows of this many positions at most; None: padded

    def order(self) -> Iterator[int]:
        """Endless sample indices, epoch after epoch, each reshuffled by a seeded generator:
        padded and packed batches draw the same conversations in the same order."""
        rng = random.Random(self.seed)
        while True:
            epoch = list(range(len(self.train.samples)))
            rng.shuffle(epoch)
            yield from epoch

    def train_batches(self) -> Iterator[dict]:
        """Endless training batches: padded, or packed rows when pack_tokens is set."""
        order = self.order()
        if self.pack_tokens is None:
            while True:
                yield collate([self.train.samples[next(order)] for _ in range(self.batch_size)],
                              self.pad_id, self.pad_to)
        row, used = [], 0
        for i in order:  # greedy in data order: a conversation that does not fit opens the next row
            sample = self.train.samples[i]
            if row and used + len(sample[0]) > self.pack_tokens:
                yield pack(row)
                row, used = [], 0
            row.append(sample)
            used += len(sample[0])

    def eval_batches(self) -> Iterator[dict]:
        s = self.eval.samples if self.eval else []
        for i in range(0, len(s), self.batch_size):
            yield collate(s[i : i + self.batch_size], self.pad_id, None)


def pack_budget(train: Split, data_cfg, batch_size: int) -> int:
    """A packed row's positions. `positions`: a padded batch's, 4 x 512 = 2,048. `conversations`:
    a padded batch's conversations on average; a greedy row ends ~half a conversation short of its
    budget, so 4 conversations of mean length 72 need (4 + 1/2) x 72 = 324."""
    if data_cfg.pack_budget == "positions":
        return batch_size * data_cfg.max_seq_len
    mean = sum(len(ids) for ids, _ in train.samples) / len(train.samples)
    return round((batch_size + 0.5) * mean)


def build(raw: RawData, data_cfg, tokenizer, batch_size: int, seed: int) -> Data:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token; the chat format needs </s>")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    name = data_cfg.train_file or data_cfg.source
    train = tokenize_split(raw.train, tokenizer, data_cfg.max_seq_len, name)
    ev = tokenize_split(raw.eval, tokenizer, data_cfg.max_seq_len, data_cfg.eval_file or name) if raw.eval else None
    pad_to = data_cfg.max_seq_len if data_cfg.pad_to == "max_seq_len" else None
    pack_tokens = (data_cfg.pack_tokens or pack_budget(train, data_cfg, batch_size)) if data_cfg.pack else None
    stats = {"train_samples": len(train.samples), "eval_samples": len(ev.samples) if ev else 0,
             "dropped_no_target": train.dropped_no_target + (ev.dropped_no_target if ev else 0),
             "skipped_bad_lines": raw.skipped_bad_lines}
    if pack_tokens:
        stats["pack_tokens"] = pack_tokens
    return Data(train, ev, batch_size, pad_id, pad_to, seed, stats, pack_tokens)
