"""The chitchat conversations in qlab's JSONL layout: the frozen train/held-out split, the turn
rules, and the reproducible multiple-choice items built from the held-out part."""

import hashlib
import importlib.util
import json

import pytest

from qlab.reference import chitchat

pytestmark = pytest.mark.skipif(importlib.util.find_spec("chitchat_dataset") is None,
                                reason=f"chitchat-dataset wheel not installed ({chitchat.INSTALL})")

# write_multiple_choice(eval, n=None, seed=0): 212 items, one per held-out conversation
MC_SHA256 = "a11f7b7b8b5a657e77c03357f9de7cadf858b88622511e05dd6b0fba4e64fa6c"


@pytest.fixture(scope="module")
def split(qlab_cache):
    return chitchat.build()


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_split_is_frozen(split):
    train, held = split
    assert train.parent.parent == chitchat.cache_root() / "data"
    assert sha256(train) == chitchat.TRAIN_SHA256 and sha256(held) == chitchat.EVAL_SHA256
    train_recs, held_recs = read(train), read(held)
    assert (len(train_recs), len(held_recs)) == (chitchat.TRAIN_COUNT, chitchat.EVAL_COUNT)
    assert not {r["id"] for r in train_recs} & {r["id"] for r in held_recs}
    assert all(chitchat.is_heldout(r["id"]) for r in held_recs)
    assert not any(chitchat.is_heldout(r["id"]) for r in train_recs)
    assert (train.parent / "LICENSE").read_text().startswith("MIT License")


def test_build_is_idempotent(split):
    before = [p.stat().st_mtime_ns for p in split]
    assert chitchat.build() == split
    assert [p.stat().st_mtime_ns for p in split] == before


def test_qlab_reads_the_layout(split):
    from qlab.run.data import load_conversations

    convs, skipped = load_conversations(str(split[1]))
    assert skipped == 0 and len(convs) == chitchat.EVAL_COUNT
    assert all(h and a for conv in convs for h, a in conv)


def test_turn_rules():
    def msg(sender, text):
        return {"sender": sender, "text": text, "timestamp": ""}

    a, b = "a-id", "b-id"
    groups = [[msg(a, "Hello"), msg(a, "How are you?")], [msg(b, "  fine "), msg(b, "")],
              [msg(a, "")], [msg(b, "and you?")], [msg(a, "good")], [msg(b, "cool")], [msg(a, "bye")]]
    # b's turns around a's empty message merge; a's last turn has no reply and is dropped
    assert chitchat.to_turns(groups) == [
        {"human": "Hello\nHow are you?", "assistant": "fine\nand you?"},
        {"human": "good", "assistant": "cool"},
    ]
    assert chitchat.to_turns([[msg(a, "anyone there?")]]) == []


def test_a_changed_source_is_refused(monkeypatch):
    monkeypatch.setattr(chitchat, "SOURCE_SHA256", "0" * 64)
    with pytest.raises(chitchat.ChitchatError, match="sha256"):
        chitchat.load_source()


def test_multiple_choice_items(split, tmp_path):
    held = {r["id"]: r["conversation"] for r in read(split[1])}
    items = chitchat.multiple_choice_items(split[1], n=50, seed=1)
    assert items == chitchat.multiple_choice_items(split[1], n=50, seed=1)
    assert items != chitchat.multiple_choice_items(split[1], n=50, seed=2)
    assert len({it["id"] for it in items}) == 50
    for it in items:
        cid, k = it["id"].rsplit("#", 1)
        turns = held[cid]
        assert it["choices"][it["gold"]] == turns[int(k)]["assistant"]
        assert len(set(it["choices"])) == 4
        assert it["context"].endswith(f"Human: {turns[int(k)]['human']}\nAssistant:")
        assert it["history"] == turns[:int(k)]
    golds = [it["gold"] for it in chitchat.multiple_choice_items(split[1], seed=0)]
    assert all(golds.count(g) > 30 for g in range(4))  # 212 items, ~53 per position
    with pytest.raises(ValueError, match="212 conversations"):
        chitchat.multiple_choice_items(split[1], n=213)


def test_multiple_choice_file_is_frozen(split, tmp_path):
    out = chitchat.write_multiple_choice(split[1], tmp_path / "mc.jsonl", n=None, seed=0)
    assert len(read(out)) == chitchat.EVAL_COUNT
    assert sha256(out) == MC_SHA256
