"""What ``moescope trace`` feeds the model: the study's prompts, text files, document sets, all as documents.

A **document** is a text encoded on its own with BOS prepended; it is the unit of work, because a causal model
makes a token's state depend on the tokens before it. Results never depend on how documents are batched.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoescopeError

SHORT_PROMPT = "As an open source alternative to"
CHAT_PROMPT = (
    "As an open source alternative to Chat GPT, I do not have personal opinions. However, I can provide objective "
    "information about Chat GPT's capabilities and limitations based on its architecture and training data. "
    "Chat GPT is a powerful language model based on the GPT (Generative Pre-trained Transformer")
BUILTIN_PROMPTS = {"short": SHORT_PROMPT, "chat": CHAT_PROMPT}


class InputError(MoescopeError, ValueError):
    """The input text is empty, unreadable or does not fit the model."""


@dataclass(frozen=True)
class Document:
    """One encoded document: its source text (or the part of it, when split) and token ids, BOS first."""

    text: str
    ids: tuple[int, ...]


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, stripped, empty ones dropped."""
    blocks = (" ".join(line.strip() for line in block.splitlines() if line.strip())
              for block in re.split(r"\n\s*\n", text))
    return [b for b in blocks if b]


def wikitext_lines(text: str, count: int = 10) -> list[str]:
    """The study's long-input rule: the first ``count`` non-empty, non-heading lines of a WikiText file."""
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("=")][:count]


def read_documents(path: str | Path) -> list[str]:
    """Texts of a document set: every ``*.txt`` of a directory (sorted), or the ``text`` field of each JSONL line."""
    path = Path(path)
    if path.is_dir():
        return [_read(f) for f in sorted(path.glob("*.txt"))]
    if not path.is_file():
        raise InputError(f"'{path}' does not exist: pass a directory of .txt files or a .jsonl file")
    texts = []
    for number, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{path}:{number}: expected a JSON object with a 'text' field ({err})") from None
    return texts


def context_length(model) -> int:
    """The model's context in tokens (config.json; 4096 when it does not say)."""
    config = model.config
    return int(config.get("max_position_embeddings") or config.get("max_seq_len") or 4096)


def encode_documents(tokenizer, texts: list[str], max_length: int, max_tokens: int | None = None) -> list[Document]:
    """Encode each text on its own with BOS prepended; split texts longer than ``max_length`` (with a warning)
    and stop once ``max_tokens`` tokens are collected (the last document is cut there)."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError("the input is empty: give a prompt, a text file or documents with some text in them")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    room = max_length - len(bos)
    documents: list[Document] = []
    total = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = [ids[start:start + room] for start in range(0, len(ids), room)]
        if len(pieces) > 1:
            warnings.warn(f"a document of {len(ids)} tokens is longer than the model's context ({max_length}); "
                          f"it is split into {len(pieces)} documents", stacklevel=2)
        for piece in pieces:
            if max_tokens is not None:
                piece = piece[:max(max_tokens - total - len(bos), 0)]
            if not piece:
                return documents
            documents.append(Document(text if len(pieces) == 1 else tokenizer.decode(piece), tuple(bos + piece)))
            total += len(bos) + len(piece)
    return documents


def documents_hash(documents: list[Document]) -> str:
    """sha256 of the token ids of every document, so a result can be traced to its input."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(json.dumps(doc.ids).encode())
    return digest.hexdigest()


def bundled_long_text() -> Path:
    """The freely licensed long text shipped with moescope (held out of the bundled models' training data)."""
    return Path(__file__).resolve().parent.parent / "data" / "long_text.txt"


def select_input(prompt: str | None = None, builtin: str | None = None, text: str | Path | None = None,
                 wikitext: str | Path | None = None, documents: str | Path | None = None) -> tuple[list[str], str]:
    """The texts to trace (each a document) and a description of where they came from.

    At most one source: a prompt, a built-in input (``short``, ``chat``, ``long``), a text file (one document
    per paragraph), a WikiText file (the study's rule) or a document set. Default: the bundled long text.
    """
    given = {k: v for k, v in dict(prompt=prompt, builtin=builtin, text=text, wikitext=wikitext,
                                   documents=documents).items() if v is not None}
    if len(given) > 1:
        raise InputError(f"give one input, not {' and '.join('--' + k for k in given)}")
    kind, value = next(iter(given.items()), ("builtin", "long"))
    if kind == "prompt":
        return [value], "prompt"
    if kind == "builtin":
        if value == "long":
            return paragraphs(_read(bundled_long_text())), "builtin:long"
        if value not in BUILTIN_PROMPTS:
            raise InputError(f"unknown built-in input {value!r}; choose from {sorted(BUILTIN_PROMPTS) + ['long']}")
        return [BUILTIN_PROMPTS[value]], f"builtin:{value}"
    if kind == "documents":
        return read_documents(value), f"documents:{value}"
    content = _read(Path(value))
    return (wikitext_lines(content), f"wikitext:{value}") if kind == "wikitext" else (paragraphs(content),
                                                                                          f"text:{value}")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"cannot read '{path}': {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise InputError(f"'{path}' is not UTF-8 text ({err.reason} at byte {err.start}); expected a UTF-8 text "
                         "file. Convert it first (e.g. iconv -f latin1 -t utf-8).") from None
