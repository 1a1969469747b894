"""The embedded pretraining corpus: Python standard-library sources, frozen in the repository.

`qlab/assets/corpus/python-stdlib.txt.gz` holds the library code of CPython 3.11.7's standard
library (607 `.py` files; test suites, generated tables and machine-specific files left out), one
record per file: "\\x1e" + relative path + "\\n" + text. The committed file is the source of truth,
checked against SHA256SUMS on every load, so every machine trains on the same bytes; `--build`
shows how it was made. Train / held-out split by file, on a hash of the path. Selection, format
and split: docs/pretrained-base.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from qlab.config import ASSETS
from qlab.results import store

CORPUS_DIR = ASSETS / "corpus"
CORPUS_NAME = "python-stdlib.txt.gz"
SUMS_NAME = "SHA256SUMS"
LICENSE_NAME = "LICENSE"
SEP = "\x1e"
HELDOUT_FRACTION = 0.03  # 17 of 607 files, 221 kB = 2.25% of the text

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data"}
EXCLUDED_FILES = {"html/entities.py"}


class CorpusError(RuntimeError):
    """The corpus file is missing, does not match its checksum, or is malformed."""


@dataclass(frozen=True)
class Document:
    path: str  # relative to the stdlib directory, POSIX separators
    text: str


@dataclass(frozen=True)
class Corpus:
    documents: tuple[Document, ...]
    sha256: str  # of the compressed file, as in SHA256SUMS
    path: Path

    def split(self) -> tuple[list[Document], list[Document]]:
        """(train, heldout), by file: deterministic, disjoint, independent of the other files."""
        train, held = [], []
        for doc in self.documents:
            (held if is_heldout(doc.path) else train).append(doc)
        return train, held

    @property
    def chars(self) -> int:
        return sum(len(d.text) for d in self.documents)


def is_heldout(path: str) -> bool:
    h = int.from_bytes(hashlib.sha256(f"qlab-heldout:{path}".encode()).digest()[:8], "big")
    return h < HELDOUT_FRACTION * 2**64


def expected_sha256(directory: Path = CORPUS_DIR, name: str = CORPUS_NAME) -> str:
    sums = Path(directory) / SUMS_NAME
    if not sums.is_file():
        raise CorpusError(f"{sums} is missing: cannot verify {name} (restore it: git checkout -- qlab/assets/corpus)")
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == name:
            return parts[0].lower()
    raise CorpusError(f"{sums} has no line for {name}")


def checksum(directory: Path = CORPUS_DIR, name: str = CORPUS_NAME) -> str:
    """The corpus identity used in cache keys: the compressed file's SHA-256, checked against
    SHA256SUMS (a CorpusError otherwise)."""
    path = Path(directory) / name
    if not path.is_file():
        raise CorpusError(f"corpus file missing: {path}")
    want = expected_sha256(directory, name)
    got = store.files_sha256([path])
    if got != want:
        raise CorpusError(
            f"corpus checksum mismatch for {path}: SHA256SUMS says {want}, the file hashes to {got}. "
            "The file is corrupted or was changed; restore it from the repository "
            "(git checkout -- qlab/assets/corpus) rather than rebuilding, so results stay comparable."
        )
    return got


def load(directory: Path = CORPUS_DIR, name: str = CORPUS_NAME) -> Corpus:
    """Verify the checksum (every call), decompress and parse the records."""
    digest = checksum(directory, name)
    path = Path(directory) / name
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path}: cannot decompress/decode: {e}") from None
    return Corpus(tuple(parse(text, str(path))), digest, path)


def parse(text: str, where: str = "corpus") -> list[Document]:
    if not text.startswith(SEP):
        raise CorpusError(f"{where}: does not start with a record separator")
    docs = []
    for record in text[1:].split(SEP):
        head, nl, body = record.partition("\n")
        if not nl or not head:
            raise CorpusError(f"{where}: malformed record near {head[:60]!r}")
        docs.append(Document(head, body))
    return docs


def select(stdlib: Path) -> list[Path]:
    """The sorted relative paths of the files that go in (see the module docstring)."""
    out = []
    for p in stdlib.rglob("*.py"):
        rel = p.relative_to(stdlib)
        if any(part in EXCLUDED_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata") or rel.as_posix() in EXCLUDED_FILES:
            continue
        if p.is_file():
            out.append(rel)
    return sorted(out, key=lambda r: r.as_posix())


def render(stdlib: Path, files: list[Path]) -> str:
    parts = []
    for rel in files:
        text = (stdlib / rel).read_bytes().decode("utf-8")  # PEP 3120: stdlib sources are UTF-8
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if SEP in text:
            raise CorpusError(f"{rel}: contains the record separator 0x1E")
        if not text.endswith("\n"):
            text += "\n"
        parts.append(f"{SEP}{rel.as_posix()}\n{text}")
    return "".join(parts)


def build(stdlib: Path | None = None, out_dir: Path = CORPUS_DIR) -> dict:
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"]).resolve()
    version = sys.version.split()[0]
    files = select(stdlib)
    text = render(stdlib, files)
    raw = text.encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CORPUS_NAME).write_bytes(data)
    (out_dir / SUMS_NAME).write_text(f"{digest}  {CORPUS_NAME}\n")
    licence = stdlib / "LICENSE.txt"
    held = sum(is_heldout(f.as_posix()) for f in files)
    note = (
        f"qlab/assets/corpus/{CORPUS_NAME}\n"
        f"{'=' * (len(CORPUS_NAME) + 19)}\n\n"
        f"Source: the .py files of the Python {version} standard library ({len(files)} files,\n"
        f"{len(raw):,} bytes of UTF-8 text; {len(data):,} bytes gzip-compressed), extracted\n"
        "by `python -m qlab.reference.corpus --build` (selection rules in docs/pretrained-base.md).\n"
        f"sha256 of the compressed file: {digest}\n"
        "The text is unmodified except that line endings are normalized to LF and each file\n"
        "is preceded by a 0x1E byte and its relative path.\n"
        f"Train/held-out split by file: {len(files) - held} / {held} files.\n\n"
        f"Python {version} is Copyright (c) 2001-2023 Python Software Foundation; All Rights\n"
        "Reserved, and earlier copyrights as listed below. It is distributed under the PSF\n"
        "License Agreement, reproduced in full from the distribution's LICENSE.txt below.\n\n"
        + "-" * 78 + "\n\n"
    )
    (out_dir / LICENSE_NAME).write_text(note + (licence.read_text() if licence.is_file() else
                                               "(LICENSE.txt not found beside the sources: see "
                                               "https://docs.python.org/3/license.html)\n"))
    return {"python": version, "stdlib": str(stdlib), "files": len(files), "heldout_files": held,
            "raw_bytes": len(raw), "gz_bytes": len(data), "sha256": digest, "out": str(out_dir)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlab.reference.corpus", description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="store_true",
                    help="extract the corpus from this interpreter's stdlib (the committed one is 3.11.7)")
    ap.add_argument("--stdlib", type=Path, default=None, help="stdlib directory (default: this interpreter's)")
    ap.add_argument("--out", type=Path, default=CORPUS_DIR, help=f"output directory (default {CORPUS_DIR})")
    args = ap.parse_args(argv)
    if args.build:
        for k, v in build(args.stdlib, args.out).items():
            print(f"{k:14s} {v}")
        return 0
    try:
        corpus = load(args.out)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    train, held = corpus.split()
    print(f"{corpus.path}: ok, sha256 {corpus.sha256}")
    print(f"{len(corpus.documents)} files, {corpus.chars:,} characters; "
          f"train {len(train)} files ({sum(len(d.text) for d in train):,} chars), "
          f"held-out {len(held)} files ({sum(len(d.text) for d in held):,} chars)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
