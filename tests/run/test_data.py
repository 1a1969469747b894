import json

import pytest

from qlab.run import data
from qlab.run.data import IGNORE_INDEX, DataError


class CharTokenizer:
    """One id per character (offset past the specials): lets tests check masks by hand."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=False):
        class Out:
            input_ids = [10 + ord(c) % 1000 for c in text]

        return Out()


def ids(text):
    return CharTokenizer()(text).input_ids


def test_multi_turn_mask_token_by_token():
    conv = [("hi", "yo"), ("ok?", "sure")]
    got_ids, labels = data.encode(conv, CharTokenizer(), max_seq_len=100)
    # <s> h i </s> y o </s> o k ? </s> s u r e </s>
    assert got_ids == [1, *ids("hi"), 2, *ids("yo"), 2, *ids("ok?"), 2, *ids("sure"), 2]
    x = IGNORE_INDEX
    assert labels == [x, x, x, x, *ids("yo"), 2, x, x, x, x, *ids("sure"), 2]


def test_chinese_text_is_masked_the_same_way():
    conv = [("你好", "你好！有什么可以帮你的吗？")]
    got_ids, labels = data.encode(conv, CharTokenizer(), max_seq_len=100)
    n_h = 1 + 2 + 1  # <s> 你 好 </s>
    assert labels[:n_h] == [IGNORE_INDEX] * n_h
    assert labels[n_h:] == ids("你好！有什么可以帮你的吗？") + [2]
    assert got_ids[n_h:] == labels[n_h:]


def test_truncation_keeps_partial_target_and_drops_targetless():
    conv = [("abcd", "efgh"), ("ijkl", "mnop")]
    # cut inside the first answer: <s> a b c d </s> e f  -> 2 target tokens survive
    got_ids, labels = data.encode(conv, CharTokenizer(), max_seq_len=8)
    assert len(got_ids) == 8 and labels[-2:] == ids("ef")
    # cut before any answer token: nothing to learn, dropped
    assert data.encode(conv, CharTokenizer(), max_seq_len=6) is None
    split = data.tokenize_split([conv, [("a", "b")]], CharTokenizer(), max_seq_len=6, name="t")
    assert len(split.samples) == 1 and split.dropped_no_target == 1


def test_real_tokenizer_round_trip(qlab_cache):
    """The preset tokenizer (trained locally) encodes Chinese and places the specials."""
    from qlab.run import presets

    tok = presets.build_tokenizer()
    got_ids, labels = data.encode([("把“水”翻译成英文。", "“水”的英文是“water”。")], tok, 512)
    assert got_ids[0] == tok.bos_token_id and got_ids[-1] == tok.eos_token_id
    first_target = next(i for i, l in enumerate(labels) if l != IGNORE_INDEX)
    assert got_ids[first_target - 1] == tok.eos_token_id  # the human turn's </s>
    answer = tok.decode(got_ids[first_target:-1])
    assert answer == "“水”的英文是“water”。"


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(l if isinstance(l, str) else json.dumps(l, ensure_ascii=False) for l in lines) + "\n")
    return str(p)


def test_alpaca_and_conversation_layouts(tmp_path):
    path = write(tmp_path, [
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"instruction": "Hi", "output": "Hello"},
        {"conversation": [{"human": "a", "assistant": "b"}, {"human": "c", "assistant": "d"}]},
    ])
    convs, skipped = data.load_conversations(path)
    assert convs == [[("Add\n1 and 2", "3")], [("Hi", "Hello")], [("a", "b"), ("c", "d")]]
    assert skipped == 0


@pytest.mark.parametrize("bad, why", [
    ("{not json", "Expecting property name"),
    ('{"conversation": []}', "non-empty list"),
    ('{"conversation": [{"human": "a"}]}', "turn 0 needs string fields"),
    ('{"text": "x"}', "no 'conversation' or 'instruction' field"),
    ('[1, 2]', "JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, why):
    path = write(tmp_path, [{"instruction": "a", "output": "b"}, bad])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: .*{why}"):
        data.load_conversations(path)
    convs, skipped = data.load_conversations(path, on_bad_line="skip")
    assert len(convs) == 1 and skipped == 1


def test_collate_pads_and_masks():
    batch = data.collate([([1, 5, 6], [IGNORE_INDEX, 5, 6]), ([1, 7], [IGNORE_INDEX, 7])], pad_id=0, pad_to=4)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 0], [1, 7, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100], [-100, 7, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]


# -- real models and real conversations -----------------------------------------------------------

from conftest import CHITCHAT, GEMMA, SMOLLM2  # noqa: E402


@pytest.fixture(scope="module")
def chitchat_eval(qlab_cache):
    from qlab.reference import chitchat

    return data.load_conversations(str(chitchat.build()[1]))[0]


@SMOLLM2
@CHITCHAT
def test_chitchat_mask_with_smollm2_token_by_token(chitchat_eval):
    """The seed format with SmolLM2-Instruct's tokenizer: its bos <|im_start|> opens the sequence,
    its eos <|im_end|> (the end of turn the instruct model emits, where generation stops) closes
    each utterance; labels on the assistant replies and their closing <|im_end|> only. Measured on
    24 held-out conversations before any fine-tuning (mean NLL of the assistant tokens): closing
    turns with <|im_end|> 4.42 nats/token, with <|endoftext|> 5.08; opening with <|im_start|>,
    <|endoftext|> or nothing 4.435 / 4.420 / 4.417: the model reads the format."""
    from transformers import AutoTokenizer

    from qlab.reference import gguf

    tok = AutoTokenizer.from_pretrained(gguf.ensure("smollm2-135m"))
    conv = chitchat_eval[0]  # the first held-out conversation
    assert conv[:2] == [("Hey!", "What up"), ("That is a loaded question", "Oh I think you know what we need to do.")]
    ids, labels = data.encode(conv, tok, max_seq_len=34)
    S, E = "<|im_start|>", "<|im_end|>"
    expected = [  # (token, trained on)
        (S, 0), ("Hey", 0), ("!", 0), (E, 0),
        ("What", 1), ("Ġup", 1), (E, 1),
        ("That", 0), ("Ġis", 0), ("Ġa", 0), ("Ġloaded", 0), ("Ġquestion", 0), (E, 0),
        ("Oh", 1), ("ĠI", 1), ("Ġthink", 1), ("Ġyou", 1), ("Ġknow", 1), ("Ġwhat", 1), ("Ġwe", 1), ("Ġneed", 1),
        ("Ġto", 1), ("Ġdo", 1), (".", 1), (E, 1),
        ("If", 0), ("Ġyou", 0), ("Ġwere", 0), ("Ġin", 0), ("Ġpower", 0), ("Ġwhat", 0), ("Ġwould", 0), ("Ġyou", 0),
        ("Ġdo", 0),  # max_seq_len=34 cuts the third human turn here
    ]
    assert list(zip(tok.convert_ids_to_tokens(ids), [int(x != IGNORE_INDEX) for x in labels])) == expected
    assert all(x == i for x, i in zip(labels, ids) if x != IGNORE_INDEX)  # a label is its own token
    assert (ids[0], tok.bos_token_id, tok.eos_token_id) == (1, 1, 2)
    # the whole conversation: every assistant reply and its <|im_end|> is a target, nothing else
    ids, labels = data.encode(conv, tok, max_seq_len=10**6)
    targets = [i for i, x in zip(ids, labels) if x != IGNORE_INDEX]
    assert targets == [t for _, a in conv for t in tok(a, add_special_tokens=False).input_ids + [2]]


@GEMMA
@CHITCHAT
@pytest.mark.slow
def test_gemma_sequences_start_with_bos(chitchat_eval):
    """Gemma needs <bos> first (12 held-out conversations' assistant tokens cost 3.94 nats/token
    with it, 5.23 without, before fine-tuning); its eos <eos> closes each utterance (5.29 with
    <end_of_turn> instead)."""
    from transformers import AutoTokenizer

    from qlab.reference import gguf

    tok = AutoTokenizer.from_pretrained(gguf.ensure("gemma3-270m"))  # joins and converts once: ~1-2 min
    ids, labels = data.encode(chitchat_eval[0], tok, max_seq_len=64)
    assert tok.convert_ids_to_tokens(ids[:5]) == ["<bos>", "Hey", "!", "<eos>", "What"]
    assert labels[:4] == [IGNORE_INDEX] * 4 and labels[4] == ids[4]
