"""The calibration texts from the exllamav3 wheel: the recorded bytes, split into documents,
read without importing exllamav3."""

import importlib.util
import subprocess
import sys

import pytest

from qlab.reference import texts

pytestmark = pytest.mark.skipif(importlib.util.find_spec("exllamav3") is None,
                                reason=f"exllamav3 wheel not installed ({texts.INSTALL})")


@pytest.mark.parametrize("name", sorted(texts.TEXTS))
def test_each_text_is_the_recorded_bytes(name):
    text = texts.read(name)  # raises on a checksum mismatch
    assert len(text.encode("utf-8")) == texts.TEXTS[name]["bytes"]
    assert texts.TEXTS[name]["licence"]


def test_a_changed_file_is_refused(monkeypatch):
    monkeypatch.setitem(texts.TEXTS["tinystories"], "sha256", "0" * 64)
    with pytest.raises(texts.TextError, match="sha256"):
        texts.read("tinystories")


def test_unknown_text_names_the_known_ones():
    with pytest.raises(texts.TextError, match="wiki"):
        texts.read("wikitext-103")


def test_wiki_splits_into_its_articles():
    docs = texts.documents("wiki")
    assert len(docs) == 1_095  # of 2,349 <doc> entries; the others are title-only redirects
    assert all(d.text != d.title and len(d.text) > len(d.title) for d in docs)
    assert len({d.id for d in docs}) == len(docs)
    first = docs[0]
    assert first.id == "8721554" and first.title == "2007 European Parliament election in Romania"
    assert first.text.startswith(first.title + "\n")  # WikiExtractor's title line is kept
    assert not any("<doc" in d.text or "</doc>" in d.text for d in docs)


def test_tinystories_and_c4_split_into_documents():
    stories, web = texts.documents("tinystories"), texts.documents("c4")
    assert len(stories) == 317 and stories[0].text.startswith("One day, a little girl named Lily")
    assert not any("<|endoftext|>" in d.text for d in stories)
    assert len(web) == 584 and all(d.text for d in web)


def test_reading_does_not_import_exllamav3():
    code = "import sys; from qlab.reference import texts; texts.documents('wiki'); print('exllamav3' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
