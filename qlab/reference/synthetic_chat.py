"""The embedded default dataset: synthetic multi-turn chats, regenerated deterministically.

    python -m qlab.reference.synthetic_chat      # rewrites qlab/assets/chat/{train,eval}.jsonl

The chats follow the MOSS/Firefly layout the seed document uses
(`{"conversation": [{"human": ..., "assistant": ...}, ...]}`), in English and Chinese. Every
answer follows from its question by a fixed rule (arithmetic, counting, reversing a word, a
small bilingual dictionary, facts about a fixed set of fictional planets), so a model can
learn them: a few hundred LoRA steps visibly lower the held-out loss. Follow-up turns refer
to the previous answer ("And times 3?"), so the history matters. The eval split uses the same
rules with different random draws; the generator is seeded, so the files never drift.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from qlab.config import ASSETS

OUT = ASSETS / "chat"
N_TRAIN, N_EVAL = 3000, 200

PLANETS = {  # fictional facts: consistent across the whole dataset
    "Zorba": ("blue", 3), "Quill": ("red", 0), "Marnox": ("green", 5), "Tessel": ("yellow", 1),
    "Vey": ("purple", 2), "Orlan": ("silver", 7), "Pim": ("orange", 4), "Kadath": ("black", 9),
}
WORDS = {  # English -> Chinese
    "apple": "苹果", "water": "水", "book": "书", "cat": "猫", "dog": "狗", "tea": "茶",
    "moon": "月亮", "sun": "太阳", "river": "河", "mountain": "山", "friend": "朋友",
    "school": "学校", "rain": "雨", "flower": "花", "bird": "鸟", "city": "城市",
}
CN_DIGITS = "零一二三四五六七八九"


def arithmetic(rng: random.Random) -> list[dict]:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    turns = [{"human": f"What is {a} plus {b}?", "assistant": f"{a} plus {b} is {a + b}."}]
    total = a + b
    for _ in range(rng.randint(0, 2)):
        k = rng.randint(2, 4)
        turns.append({"human": f"And times {k}?", "assistant": f"{total} times {k} is {total * k}."})
        total *= k
    return turns


def counting(rng: random.Random) -> list[dict]:
    lo = rng.randint(1, 30)
    hi = lo + rng.randint(2, 6)
    seq = ", ".join(str(i) for i in range(lo, hi + 1))
    turns = [{"human": f"Count from {lo} to {hi}.", "assistant": f"{seq}."}]
    if rng.random() < 0.5:
        back = ", ".join(str(i) for i in range(hi, lo - 1, -1))
        turns.append({"human": "Now backwards.", "assistant": f"{back}."})
    return turns


def reverse(rng: random.Random) -> list[dict]:
    word = rng.choice(list(WORDS) + ["table", "window", "garden", "planet", "music", "paper"])
    return [{"human": f"Reverse the word '{word}'.", "assistant": f"'{word}' reversed is '{word[::-1]}'."}]


def translate(rng: random.Random) -> list[dict]:
    en, zh = rng.choice(list(WORDS.items()))
    if rng.random() < 0.5:
        turns = [{"human": f"把“{zh}”翻译成英文。", "assistant": f"“{zh}”的英文是“{en}”。"}]
    else:
        turns = [{"human": f"How do you say '{en}' in Chinese?", "assistant": f"'{en}' in Chinese is “{zh}”."}]
    if rng.random() < 0.4:
        en2, zh2 = rng.choice(list(WORDS.items()))
        turns.append({"human": f"那“{zh2}”呢？", "assistant": f"“{zh2}”的英文是“{en2}”。"})
    return turns


def planets(rng: random.Random) -> list[dict]:
    name = rng.choice(list(PLANETS))
    colour, moons = PLANETS[name]
    turns = [{"human": f"What colour is the planet {name}?", "assistant": f"{name} is {colour}."}]
    if rng.random() < 0.6:
        turns.append({"human": "How many moons does it have?",
                      "assistant": f"{name} has {moons} moon{'s' if moons != 1 else ''}."})
    if rng.random() < 0.3:
        turns.append({"human": "用中文说它有几个卫星。", "assistant": f"{name}有{CN_DIGITS[moons]}个卫星。"})
    return turns


def greeting(rng: random.Random) -> list[dict]:
    if rng.random() < 0.5:
        return [{"human": "你好", "assistant": "你好！有什么可以帮你的吗？"}]
    return [{"human": "Hello!", "assistant": "Hello! How can I help you today?"}]


TASKS = (arithmetic, counting, reverse, translate, planets, greeting)


def conversation(rng: random.Random) -> dict:
    turns = []
    for _ in range(rng.choice((1, 1, 2, 2, 3))):  # 1-3 topics per chat (a topic has 1-3 turns)
        turns += rng.choice(TASKS)(rng)
    return {"conversation": turns}


def write(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(conversation(rng), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    write(OUT / "train.jsonl", N_TRAIN, seed=1)
    write(OUT / "eval.jsonl", N_EVAL, seed=2)
    print(f"wrote {N_TRAIN} train and {N_EVAL} eval chats to {OUT}")
