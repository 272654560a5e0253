"""The text shipped with moescope: a prose corpus from the Python documentation (PSF licence; see README.md).

* ``train.txt.gz`` / ``validation.txt.gz``: documents split by name (about 95 % / 5 %); each document is a
  ``= name: title =`` line followed by paragraphs separated by blank lines;
* ``long_text.txt``: the held-out long text (19 paragraphs, about 1,600 tokens) that ``moescope trace`` reads by
  default; no paragraph of it is in either split;
* ``instruct.txt``: instruction / response pairs, ``[INST] question [/INST] answer`` separated by blank lines,
  generated from templates over the training documents.

``build_corpus.py`` rebuilds all four from the Python 3.11 documentation sources.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class Document:
    name: str
    title: str
    paragraphs: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(self.paragraphs)


def split_path(split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the corpus has {', '.join(SPLITS)}")
    return DATA_DIR / f"{split}.txt.gz"


def long_text_path() -> Path:
    """The held-out long text (plain prose, paragraphs separated by blank lines)."""
    return DATA_DIR / "long_text.txt"


def long_text() -> str:
    return long_text_path().read_text(encoding="utf-8")


def instruct_path() -> Path:
    return DATA_DIR / "instruct.txt"


@cache
def documents(split: str) -> tuple[Document, ...]:
    """The documents of ``split`` in file order."""
    text = gzip.decompress(split_path(split).read_bytes()).decode("utf-8")
    docs: list[Document] = []
    for chunk in text.split("\n= ")[0:]:
        chunk = chunk if chunk.startswith("= ") else "= " + chunk
        header, _, body = chunk.partition("\n")
        name, _, title = header[2:].rstrip().removesuffix(" =").partition(": ")
        paragraphs = tuple(p.strip() for p in body.split("\n\n") if p.strip())
        if paragraphs:
            docs.append(Document(name, title, paragraphs))
    return tuple(docs)


def instruct_pairs() -> list[tuple[str, str]]:
    """(instruction, response) pairs in file order."""
    pairs = []
    for block in instruct_path().read_text(encoding="utf-8").split("\n\n"):
        block = block.strip()
        if not block:
            continue
        question, sep, answer = block.removeprefix("[INST] ").partition(" [/INST] ")
        if not sep:
            raise ValueError(f"malformed instruction pair in {instruct_path()}: {block[:80]!r}")
        pairs.append((question, answer))
    return pairs
