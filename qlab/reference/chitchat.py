"""Real English multi-turn chat data from a PyPI wheel, in qlab's conversation JSONL layout.

The Chit-Chat Challenge dataset (BYU PCC lab, MIT licence) ships as `chitchat_dataset/dataset.json`
in the `chitchat-dataset` wheel: 7,168 conversations between two people, each a list of message
groups, one group per speaker turn and several short messages per group. `build()` reads it
without importing the package, checks its SHA-256, and writes

    {"id": "<conversation id>", "conversation": [{"human": "...", "assistant": "..."}, ...]}

one conversation per line, the layout qlab's data module reads (it puts the loss on the
assistant turns). The first speaker of a conversation is the human, the other the assistant;
a speaker's consecutive messages join with a newline; empty messages are dropped; a final human
turn without a reply is dropped, and so are the 3,151 conversations nobody answered.

The held-out split is by conversation, chosen from a hash of the conversation id (1 in 20), so
it does not depend on file order or on a random seed; the produced bytes are frozen by
`TRAIN_SHA256`/`EVAL_SHA256` and the build refuses to return anything else.

`multiple_choice_items()` turns held-out conversations into 4-way multiple-choice items (the true
next reply against replies from other held-out conversations) for an lm-evaluation-harness task.

    python -m qlab.reference.chitchat          # build once; print the paths and counts
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

from qlab.reference import installed_dir
from qlab.run.presets import build_once, cache_root

PACKAGE, VERSION, MODULE = "chitchat-dataset", "0.9.0", "chitchat_dataset"
INSTALL = f"pip install --no-deps {PACKAGE}=={VERSION}"  # wheel 8,105,664 B
SOURCE_FILE = "dataset.json"
SOURCE_SHA256 = "d2a5d0bf6acf354fef51f3af39cbece2220d3b8f6086b658c3d335105798312a"  # 40,303,934 B
LICENCE = "MIT (chitchat_dataset-0.9.0.dist-info/LICENSE, copied beside the built files)"

HELDOUT_ONE_IN = 20  # sha256(id) % 20 == 0: 5% of conversations held out
BUILD_VERSION = 1    # bump when the layout changes (and re-freeze the checksums below)

# The frozen split: 4,017 answered conversations = 3,805 train (63,402 turns, 13,567,798 B)
# + 212 held out (5.3%; 3,440 turns, 766,304 B).
TRAIN_SHA256 = "9c2dfabf75890f2e4bd14be94de2c066cc5ead83584e325d85063fd396d3fa25"
EVAL_SHA256 = "530a33de4d49ce11f771cbc38a462cbc238cc52cfe2a763eca2a49dbab73ba04"
TRAIN_COUNT, EVAL_COUNT = 3_805, 212


class ChitchatError(RuntimeError):
    """The dataset is not installed, or not the recorded bytes, or the split drifted."""


def source_path() -> Path:
    root = installed_dir(MODULE)
    if root is None:
        raise ChitchatError(f"the {PACKAGE} wheel is not installed: {INSTALL}")
    p = root / SOURCE_FILE
    if not p.is_file():
        raise ChitchatError(f"{p} is missing: reinstall with {INSTALL}")
    return p


def load_source() -> dict:
    data = source_path().read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SOURCE_SHA256:
        raise ChitchatError(f"{source_path()}: sha256 {digest}, expected {SOURCE_SHA256} ({PACKAGE} {VERSION})")
    return json.loads(data)


def to_turns(messages: list[list[dict]]) -> list[dict[str, str]]:
    """Message groups -> [{"human", "assistant"}, ...]; [] when nobody answered."""
    speakers: list[tuple[str, list[str]]] = []  # (sender, texts), one entry per speaker turn
    for group in messages:
        for message in group:
            text = message["text"].strip()
            if not text:
                continue
            if speakers and speakers[-1][0] == message["sender"]:
                speakers[-1][1].append(text)
            else:
                speakers.append((message["sender"], [text]))
    texts = ["\n".join(t) for _, t in speakers]
    # speakers alternate, so pairs (0,1), (2,3), ... are (human, assistant); an odd last is dropped
    return [{"human": texts[i], "assistant": texts[i + 1]} for i in range(0, len(texts) - 1, 2)]


def is_heldout(conversation_id: str) -> bool:
    return int(hashlib.sha256(conversation_id.encode()).hexdigest(), 16) % HELDOUT_ONE_IN == 0


def records(source: dict) -> tuple[list[dict], list[dict]]:
    """(train, eval) records in the dataset's file order."""
    train, held = [], []
    for cid, conv in source.items():
        turns = to_turns(conv["messages"])
        if turns:
            (held if is_heldout(cid) else train).append({"id": cid, "conversation": turns})
    return train, held


def _jsonl(recs: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode("utf-8")


def default_dir() -> Path:
    key = hashlib.sha256(f"{SOURCE_SHA256}|{HELDOUT_ONE_IN}|{BUILD_VERSION}".encode()).hexdigest()[:12]
    return cache_root() / "data" / f"chitchat-{key}"


def _complete(out: Path) -> bool:
    return all((out / f).is_file() and hashlib.sha256((out / f).read_bytes()).hexdigest() == h
               for f, h in (("train.jsonl", TRAIN_SHA256), ("eval.jsonl", EVAL_SHA256)))


def build(out_dir: Path | None = None) -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl) in `out_dir` (default `$QLAB_CACHE/data/chitchat-<hash>/`),
    built once; a second call returns the same files after checking their checksums."""
    out = Path(out_dir) if out_dir is not None else default_dir()

    def make(tmp: Path) -> None:
        train, held = records(load_source())
        blobs = {"train.jsonl": (_jsonl(train), TRAIN_SHA256), "eval.jsonl": (_jsonl(held), EVAL_SHA256)}
        tmp.mkdir(parents=True)
        for fname, (blob, want) in blobs.items():
            got = hashlib.sha256(blob).hexdigest()
            if got != want:
                raise ChitchatError(f"chitchat {fname}: sha256 {got} ({len(blob):,} B), frozen {want}: "
                                    "the split drifted; if on purpose, bump BUILD_VERSION and re-freeze")
            (tmp / fname).write_bytes(blob)
        licence = source_path().parent.parent / f"chitchat_dataset-{VERSION}.dist-info" / "LICENSE"
        if licence.is_file():
            shutil.copyfile(licence, tmp / "LICENSE")

    build_once(out, _complete, make)
    return out / "train.jsonl", out / "eval.jsonl"


def render(history: list[dict[str, str]], message: str) -> str:
    """A conversation so far as plain text ending where the assistant speaks next."""
    lines = [f"Human: {t['human']}\nAssistant: {t['assistant']}" for t in history]
    return "\n".join(lines + [f"Human: {message}\nAssistant:"])


def multiple_choice_items(eval_path: Path, n: int | None = None, seed: int = 0) -> list[dict]:
    """Up to one 4-way item per held-out conversation, `n` of them (None: all), reproducibly.

    Each item cuts a conversation at one assistant turn (chosen by the seeded RNG): `context` is
    the conversation so far (`render`; it ends with "Assistant:", so lm-eval's default target
    delimiter " " goes between it and a choice), `choices` the true reply and three replies from
    three other held-out conversations, `gold` the true reply's index. `history` and `message`
    keep the structure, for a prompt in the training format instead."""
    convs = [json.loads(line) for line in Path(eval_path).read_text(encoding="utf-8").splitlines() if line]
    if n is None:
        n = len(convs)
    if not 0 < n <= len(convs):
        raise ValueError(f"n={n}: {eval_path} has {len(convs)} conversations (one item each)")
    rng = random.Random(seed)
    order = list(range(len(convs)))
    rng.shuffle(order)
    items = []
    for ci in order[:n]:
        turns = convs[ci]["conversation"]
        k = rng.randrange(len(turns))
        answer = turns[k]["assistant"]
        distractors: list[str] = []
        used = {ci}
        while len(distractors) < 3:  # one reply from each of three other conversations
            cj = rng.randrange(len(convs))
            if cj in used:
                continue
            reply = rng.choice(convs[cj]["conversation"])["assistant"]
            if reply == answer or reply in distractors:
                continue
            used.add(cj)
            distractors.append(reply)
        gold = rng.randrange(4)
        items.append({
            "id": f"{convs[ci]['id']}#{k}",
            "context": render(turns[:k], turns[k]["human"]),
            "choices": distractors[:gold] + [answer] + distractors[gold:],
            "gold": gold,
            "history": turns[:k],
            "message": turns[k]["human"],
        })
    return items


def write_multiple_choice(eval_path: Path, out: Path, n: int | None = None, seed: int = 0) -> Path:
    """`multiple_choice_items` as JSONL at `out` (one item per line)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(_jsonl(multiple_choice_items(eval_path, n, seed)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlab.reference.chitchat", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="build here instead of $QLAB_CACHE/data/chitchat-<hash>")
    ap.add_argument("--mc", type=Path, default=None, help="also write multiple-choice items (JSONL) here")
    ap.add_argument("--mc-n", type=int, default=None)
    ap.add_argument("--mc-seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        paths = build(args.out)
    except ChitchatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in paths:
        convs = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]
        turns = sum(len(c["conversation"]) for c in convs)
        print(f"{p}  {len(convs):,} conversations, {turns:,} human/assistant turns")
    if args.mc:
        out = write_multiple_choice(paths[1], args.mc, args.mc_n, args.mc_seed)
        print(f"{out}  {sum(1 for _ in out.open()):,} multiple-choice items (seed {args.mc_seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
