"""qlab.reference.corpus: the committed corpus checked against SHA256SUMS on every load, the
train/held-out split by file, and `--build` on a tiny fabricated stdlib (selection rules,
normalization, byte-identical rebuilds, the files it writes, and a corrupted copy refused)."""

import gzip
import hashlib
import shutil

import pytest

from qlab.reference import corpus
from qlab.results import store


def test_corpus_checksum_is_verified_and_a_corrupted_copy_rejected(tmp_path):
    c = corpus.load()
    assert c.sha256 == corpus.expected_sha256() == store.files_sha256([corpus.CORPUS_DIR / corpus.CORPUS_NAME])
    assert len(c.documents) > 500 and c.chars > 5_000_000
    assert (corpus.CORPUS_DIR / corpus.CORPUS_NAME).stat().st_size < 5 * 2**20  # committed: under 5 MB
    assert "Python Software Foundation" in (corpus.CORPUS_DIR / corpus.LICENSE_NAME).read_text()

    bad = tmp_path / "corpus"
    shutil.copytree(corpus.CORPUS_DIR, bad)
    data = bytearray((bad / corpus.CORPUS_NAME).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    (bad / corpus.CORPUS_NAME).write_bytes(bytes(data))
    with pytest.raises(corpus.CorpusError, match="checksum mismatch"):
        corpus.load(bad)

    # a re-compressed file with the same text is still a different file: refused too
    text = gzip.decompress((corpus.CORPUS_DIR / corpus.CORPUS_NAME).read_bytes())
    (bad / corpus.CORPUS_NAME).write_bytes(gzip.compress(text, compresslevel=1, mtime=0))
    with pytest.raises(corpus.CorpusError, match="checksum mismatch"):
        corpus.load(bad)

    (bad / corpus.SUMS_NAME).unlink()
    with pytest.raises(corpus.CorpusError, match="SHA256SUMS is missing"):
        corpus.load(bad)


def test_splits_are_deterministic_disjoint_and_by_file():
    train, held = corpus.load().split()
    train2, held2 = corpus.load().split()
    assert [d.path for d in train] == [d.path for d in train2] and [d.path for d in held] == [d.path for d in held2]
    tp, hp = {d.path for d in train}, {d.path for d in held}
    assert not tp & hp and len(tp) + len(hp) == len(corpus.load().documents)
    chars_t, chars_h = sum(len(d.text) for d in train), sum(len(d.text) for d in held)
    assert 0.01 < chars_h / (chars_t + chars_h) < 0.05  # ~2% of the text held out
    assert all(corpus.is_heldout(p) for p in hp) and not any(corpus.is_heldout(p) for p in tp)
    # by content too: no held-out file's text appears in training
    train_texts = {d.text for d in train}
    assert not any(d.text in train_texts for d in held)


# --------------------------------------------------------------------- parsing the records


def test_parse_reads_records_and_refuses_malformed_text():
    docs = corpus.parse("\x1ea/b.py\nx = 1\n\x1ec.py\n\x1ed.py\nline\nline2\n")
    assert [(d.path, d.text) for d in docs] == [("a/b.py", "x = 1\n"), ("c.py", ""), ("d.py", "line\nline2\n")]
    with pytest.raises(corpus.CorpusError, match="does not start with a record separator"):
        corpus.parse("a.py\nx\n")
    with pytest.raises(corpus.CorpusError, match="malformed record"):
        corpus.parse("\x1ea.py\nx\n\x1eno-newline-after-the-path")
    with pytest.raises(corpus.CorpusError, match="malformed record"):
        corpus.parse("\x1e\nbody without a path\n")


def test_expected_sha256_reads_binary_mode_and_uppercase_lines(tmp_path):
    (tmp_path / corpus.SUMS_NAME).write_text(f"{'AB' * 32} *{corpus.CORPUS_NAME}\n{'cd' * 32}  other.gz\n")
    assert corpus.expected_sha256(tmp_path) == "ab" * 32
    assert corpus.expected_sha256(tmp_path, "other.gz") == "cd" * 32
    with pytest.raises(corpus.CorpusError, match="has no line for third.gz"):
        corpus.expected_sha256(tmp_path, "third.gz")
    with pytest.raises(corpus.CorpusError, match="corpus file missing"):
        corpus.checksum(tmp_path)


def test_heldout_is_about_three_percent_of_paths_and_stable():
    paths = [f"pkg{i // 100}/mod{i}.py" for i in range(20_000)]
    held = [p for p in paths if corpus.is_heldout(p)]
    # HELDOUT_FRACTION = 0.03: binomial sd over 20,000 paths is 0.12 points, so 2.5-3.5% is > 4 sd wide
    assert 0.025 < len(held) / len(paths) < 0.035
    assert held == [p for p in paths if corpus.is_heldout(p)]  # a pure function of the path
    # the decision is the first 8 bytes of SHA-256("qlab-heldout:" + path) against the fraction
    p = held[0]
    h = int.from_bytes(hashlib.sha256(f"qlab-heldout:{p}".encode()).digest()[:8], "big")
    assert h < corpus.HELDOUT_FRACTION * 2**64


# ------------------------------------------------------------------ --build on a tiny stdlib


@pytest.fixture
def stdlib(tmp_path):
    """A fabricated stdlib: files that go in, and one of each kind the selection leaves out."""
    root = tmp_path / "stdlib"
    files = {
        "os.py": "import sys\n",
        "json/__init__.py": "from .decoder import x\n",
        "json/decoder.py": "x = 'é'\r\ny = 2\r\n",  # CRLF and non-ASCII: normalized to LF, UTF-8 kept
        "email/mime/text.py": "z = 3",  # no final newline: one is added
        "test/test_os.py": "left out\n",  # test suites
        "json/tests/test_x.py": "left out\n",
        "site-packages/pkg.py": "left out\n",
        "encodings/utf_8.py": "left out\n",
        "__pycache__/os.py": "left out\n",
        "config-3.11-x86_64-linux-gnu/python-config.py": "left out\n",  # machine-specific
        "_sysconfigdata__linux_x86_64-linux-gnu.py": "left out\n",
        "html/entities.py": "left out\n",  # generated tables
        "html/parser.py": "kept\n",
        "README.txt": "not python\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(text.encode("utf-8"))
    return root


KEPT = ["email/mime/text.py", "html/parser.py", "json/__init__.py", "json/decoder.py", "os.py"]


def test_select_keeps_library_code_only_sorted(stdlib):
    assert [p.as_posix() for p in corpus.select(stdlib)] == KEPT


def test_build_writes_a_verifiable_corpus_that_loads_back_normalized(stdlib, tmp_path):
    info = corpus.build(stdlib, tmp_path / "out")
    out = tmp_path / "out"
    assert info["files"] == len(KEPT) and info["heldout_files"] == sum(corpus.is_heldout(p) for p in KEPT)
    data = (out / corpus.CORPUS_NAME).read_bytes()
    assert info["gz_bytes"] == len(data) and info["sha256"] == hashlib.sha256(data).hexdigest()
    assert (out / corpus.SUMS_NAME).read_text() == f"{info['sha256']}  {corpus.CORPUS_NAME}\n"
    assert info["raw_bytes"] == len(gzip.decompress(data))
    c = corpus.load(out)  # checked against the SHA256SUMS build wrote
    assert c.sha256 == info["sha256"] == corpus.checksum(out)
    texts = {d.path: d.text for d in c.documents}
    assert list(texts) == KEPT
    assert texts["json/decoder.py"] == "x = 'é'\ny = 2\n" and texts["email/mime/text.py"] == "z = 3\n"
    assert c.chars == sum(len(t) for t in texts.values())
    train, held = c.split()
    assert sorted(d.path for d in train + held) == KEPT and len(held) == info["heldout_files"]
    # no LICENSE.txt beside these sources: the note says where the licence is
    assert "docs.python.org/3/license.html" in (out / corpus.LICENSE_NAME).read_text()


def test_build_is_byte_identical_and_copies_the_licence(stdlib, tmp_path):
    (stdlib / "LICENSE.txt").write_text("PSF LICENSE AGREEMENT (fabricated)\n")
    a = corpus.build(stdlib, tmp_path / "a")
    b = corpus.build(stdlib, tmp_path / "b")  # gzip mtime 0, no file name: the same bytes again
    assert a["sha256"] == b["sha256"]
    data = (tmp_path / "a" / corpus.CORPUS_NAME).read_bytes()
    assert data == (tmp_path / "b" / corpus.CORPUS_NAME).read_bytes()
    # two builds within a second would match anyway: the gzip header itself holds no time (MTIME,
    # bytes 4-7, is zero) and no file name (FNAME flag, bit 3 of byte 3, unset)
    assert data[:2] == b"\x1f\x8b" and data[4:8] == bytes(4) and not data[3] & 0x08
    assert "PSF LICENSE AGREEMENT (fabricated)" in (tmp_path / "a" / corpus.LICENSE_NAME).read_text()
    (stdlib / "os.py").write_text("import sys  # changed\n")
    assert corpus.build(stdlib, tmp_path / "c")["sha256"] != a["sha256"]  # any changed byte: a new digest


def test_build_refuses_a_source_holding_the_record_separator(stdlib, tmp_path):
    (stdlib / "os.py").write_text("x = '\x1e'\n")
    with pytest.raises(corpus.CorpusError, match="os.py: contains the record separator"):
        corpus.build(stdlib, tmp_path / "out")


def test_cli_verifies_and_reports_a_corrupted_copy(stdlib, tmp_path, capsys):
    out = tmp_path / "out"
    assert corpus.main(["--build", "--stdlib", str(stdlib), "--out", str(out)]) == 0
    capsys.readouterr()
    assert corpus.main(["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ok, sha256" in text and f"{len(KEPT)} files" in text
    data = bytearray((out / corpus.CORPUS_NAME).read_bytes())
    data[-9] ^= 0x01  # a bit of the gzip trailer's CRC
    (out / corpus.CORPUS_NAME).write_bytes(bytes(data))
    assert corpus.main(["--out", str(out)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    shutil.rmtree(out)
    assert corpus.main(["--out", str(out)]) == 1
