"""Rebuild the shipped corpus from the Python 3.11 documentation sources (PSF licence).

The shipped files in this folder were made with::

    apt-get install python3.11-doc      # Debian 12: the reST sources of the Python 3.11 docs
    python -m moescope.data.build_corpus /usr/share/doc/python3.11/html/_sources

(a CPython 3.11 ``Doc/`` checkout works too: the same ``*.rst`` files, without the ``.txt`` suffix).
Only prose is kept: each paragraph of running text (top-level, or inside descriptive directives such as
``.. function::`` or ``.. note::``), with reST markup turned into plain text. Code, literal blocks, tables,
headings, index entries and paragraphs that still look like code are dropped. Documents are split
deterministically by name into train / validation, and one prose-rich document is held out whole as the long
text that ``moescope trace`` reads by default (it is in neither split). The instruction pairs are generated
from templates over the training documents only (see :func:`instructions`).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Parts of the documentation used (the C API and distutils references are left out: mostly C and build details).
SECTIONS = ("tutorial", "howto", "faq", "glossary", "reference", "library", "whatsnew", "using", "extending",
            "installing", "distributing")
SKIP_DOCS = {"whatsnew/changelog", "whatsnew/index", "library/index", "reference/index", "howto/index",
             "faq/index", "tutorial/index", "using/index", "extending/index"}
#: The held-out long text: an essay-like document, 10-20 paragraphs, that no training text contains.
LONG_TEXT_DOC = "howto/functional"   # its first LONG_TEXT_PARAGRAPHS paragraphs (the introduction); the rest of
LONG_TEXT_PARAGRAPHS = 19             # the document goes to validation, none of it to training
VALIDATION_EVERY = 20  # a document goes to validation when sha1(name) % 20 == 0 (about 5 %)

#: Directives whose body is running prose (kept); every other directive's body is dropped.
PROSE_DIRECTIVES = {
    "function", "method", "class", "attribute", "data", "exception", "decorator", "decoratormethod",
    "classmethod", "staticmethod", "abstractmethod", "coroutinefunction", "coroutinemethod", "note", "warning",
    "important", "tip", "hint", "caution", "attention", "impl-detail", "versionadded", "versionchanged",
    "deprecated", "deprecated-removed", "describe", "option", "cmdoption", "envvar", "seealso", "glossary",
    "topic", "sidebar", "admonition", "module", "currentmodule", "rubric", "container", "opcode", "pdbcommand",
    "program", "object", "availability",
}

_ASCII = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "--",
                        "\u2026": "...", "\u00a0": " ", "\u2011": "-"})


# --------------------------------------------------------------------------------------------- inline markup
def _role(match: re.Match) -> str:
    role, text = match.group(1), match.group(2)
    if role in ("ref", "doc", "numref") and "<" not in text:
        return "\x00"  # a cross-reference shown as the target's title, unknown here: the paragraph is dropped
    text = re.sub(r"\s*<[^<>]*>$", "", text) if re.search(r"<[^<>]*>$", text) and not text.startswith("<") else text
    text = text.lstrip("!")
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    return text


def inline(text: str) -> str:
    """reST inline markup to plain text (roles, literals, emphasis, links, footnotes, escapes)."""
    # ``literal`` text is kept as written; elsewhere a backslash escapes the next character.
    parts = re.split(r"(``[^`]+``)", text)
    text = "".join(p if i % 2 else re.sub(r"\\(.)", lambda m: "" if m.group(1) == " " else m.group(1), p)
                   for i, p in enumerate(parts))
    text = re.sub(r"\s*\[(#[\w-]*|\d+|\*)\]_", "", text)                      # footnote references
    text = re.sub(r":([\w:+.-]+):`([^`]+)`", _role, text)                         # :role:`text <target>`
    text = re.sub(r"``([^`]+)``", r"\1", text)                                    # ``literal``
    text = re.sub(r"`([^`<]+?)\s*<[^`>]+>`__?", r"\1", text)                      # `text <url>`_
    text = re.sub(r"`([^`]+)`__?", r"\1", text)                                   # `name`_
    text = re.sub(r"`([^`]+)`", r"\1", text)                                      # default role
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"\1", text)
    text = text.translate(_ASCII)
    text = re.sub(r"\s+", " ", text).strip()
    if text.endswith(" ::"):
        text = text[:-3].rstrip()
    elif text.endswith("::"):
        text = text[:-1]
    return text


_NOT_PROSE = ("\x00", "`", "|", "::", ".. ", ">>>", "{", "}", "==", "->", "_)", "__", "\t", " = ", "#!")
_PROSE_END = re.compile(r"""[.?!]["')]?$""")  # a paragraph ending in ':' introduces code that was dropped


def is_prose(text: str) -> bool:
    """Running English text: a sentence-like paragraph with no leftover markup or code."""
    words = text.split()
    if len(words) < 12 or not (text[0].isupper() or text[0] in "\"'("):
        return False
    if not _PROSE_END.search(text) or not text.isascii():
        return False
    if any(s in text for s in _NOT_PROSE):
        return False
    chars = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in chars)
    if letters < 0.8 * len(chars):
        return False
    codeish = sum(bool(re.search(r"[()\[\]_]", w)) or w.count(".") > 1 for w in words)
    return codeish <= 0.12 * len(words)


# ------------------------------------------------------------------------------------------------ documents
@dataclass
class Document:
    name: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    glossary: list[tuple[str, str]] = field(default_factory=list)     # (term, first definition paragraph)
    synopses: list[tuple[str, str]] = field(default_factory=list)     # (module, synopsis)
    objects: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, name, first sentence of body)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


_HEADING = re.compile(r"^([=\-~*^\"#+'`:.]){3,}\s*$")
_BULLET = re.compile(r"^(\*|-|\+|#\.|\d+\.|\(?[a-z]\)|\(\d+\))\s+")
_DIRECTIVE = re.compile(r"^\.\.\s+(?:[\w-]+:)?([\w-]+)::\s*(.*)$")


def parse(name: str, source: str) -> Document:
    """Parse one reST document into its prose paragraphs (and the facts the instruction pairs use)."""
    lines = source.expandtabs(8).splitlines()
    doc = Document(name=name, title="")
    # Blocks: runs of non-blank lines; a block's indentation is its first line's.
    blocks: list[tuple[int, list[str]]] = []
    cur: list[str] = []
    for line in lines + [""]:
        if line.strip():
            new_item = _BULLET.match(line.strip()) and _indent(line) <= _indent(cur[0]) if cur else False
            if cur and (new_item or _indent(line) < _indent(cur[0]) and not _BULLET.match(cur[0].strip())):
                blocks.append((_indent(cur[0]), cur))
                cur = []
            cur.append(line)
        elif cur:
            blocks.append((_indent(cur[0]), cur))
            cur = []
    # Context stack of (indent, keep) for directive bodies and literal blocks.
    stack: list[tuple[int, bool, str]] = []
    pending_glossary_term: str | None = None
    for indent, block in blocks:
        while stack and indent <= stack[-1][0]:
            stack.pop()
        keep = all(k for _, k, _ in stack)
        inside = stack[-1][2] if stack else ""
        first = block[0].strip()
        if _HEADING.match(first) and len(block) >= 2:  # over+underlined heading
            if not doc.title and len(block) >= 2:
                doc.title = inline(block[1].strip())
            continue
        if len(block) >= 2 and _HEADING.match(block[1].strip()) and len(block[1].strip()) >= len(first) - 2:
            if not doc.title:
                doc.title = inline(first)
            block = block[2:]
            if not block:
                continue
            first = block[0].strip()
        directive = _DIRECTIVE.match(first)
        if directive:
            kind, arg = directive.group(1), directive.group(2)
            stack.append((indent, keep and kind in PROSE_DIRECTIVES, kind))
            if kind == "module":
                for opt in block[1:]:
                    m = re.match(r"\s*:synopsis:\s*(.+)$", opt)
                    if m:
                        doc.synopses.append((arg.strip(), inline(m.group(1))))
            elif kind in ("function", "method", "class", "exception", "classmethod", "staticmethod",
                          "decorator", "coroutinefunction", "coroutinemethod"):
                stack[-1] = (indent, stack[-1][1], f"object:{kind}:{arg.split('(')[0].strip()}")
            if kind == "glossary" and keep:
                stack[-1] = (indent, True, "glossary")
            continue
        if first.startswith(".."):  # comment, target, substitution definition
            stack.append((indent, False, "comment"))
            continue
        if not keep:
            if first.endswith("::"):
                stack.append((indent, False, "literal"))
            continue
        # A glossary term is a short, unindented-within-the-glossary line followed by a more indented definition.
        if inside == "glossary" and len(block) >= 1 and all(_indent(b) == indent for b in block[:1]):
            term_lines = [b for b in block if _indent(b) == indent]
            body = [b for b in block if _indent(b) > indent]
            pending_glossary_term = inline(term_lines[0].strip())
            stack.append((indent, True, "glossary-entry:" + pending_glossary_term))
            if body:
                text = inline(" ".join(b.strip() for b in body))
                _record(doc, text, "glossary-entry:" + pending_glossary_term)
            continue
        text = " ".join(b.strip() for b in block)
        literal_follows = text.rstrip().endswith("::")
        bullet = _BULLET.match(text)
        if bullet:
            text = text[bullet.end():]
        # A definition-list term, an option line or a field list entry are not prose.
        if len(block) >= 2 and _indent(block[1]) > indent and not bullet:
            text = " ".join(b.strip() for b in block[1:])
        text = inline(text)
        if text.startswith(":") or first.startswith(":"):
            text = ""
        if text:
            _record(doc, text, inside)
        if literal_follows:
            stack.append((indent, False, "literal"))
    return doc


def _record(doc: Document, text: str, inside: str) -> None:
    if not is_prose(text):
        return
    doc.paragraphs.append(text)
    if inside.startswith("glossary-entry:"):
        term = inside.split(":", 1)[1]
        if not any(t == term for t, _ in doc.glossary):
            doc.glossary.append((term, text))
    elif inside.startswith("object:"):
        _, kind, name = inside.split(":", 2)
        if not any(n == name for _, n, _ in doc.objects):
            doc.objects.append((kind, name, first_sentence(text)))


def first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.?!])(\s+[A-Z(\"']|$)", text)
    return (m.group(1) if m else text).strip()


def read_documents(root: Path) -> list[Document]:
    docs = []
    for section in SECTIONS:
        paths = sorted(root.glob(f"{section}/**/*.rst*")) + sorted(root.glob(f"{section}.rst*"))
        for path in paths:
            name = path.relative_to(root).as_posix()
            name = re.sub(r"\.rst(\.txt)?$", "", name)
            if name in SKIP_DOCS:
                continue
            doc = parse(name, path.read_text(encoding="utf-8"))
            if doc.paragraphs:
                docs.append(doc)
    return docs


def is_validation(name: str) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % VALIDATION_EVERY == 0


def format_documents(docs: list[Document]) -> str:
    """Documents as plain text: a ``= name: title =`` line, then paragraphs separated by blank lines."""
    return "".join(f"= {d.name}: {d.title} =\n\n" + "\n\n".join(d.paragraphs) + "\n\n" for d in docs)


# ------------------------------------------------------------------------------------------- instructions
def instructions(docs: list[Document], objects: int = 250) -> list[tuple[str, str]]:
    """Instruction / response pairs generated from templates over the (training) documents.

    * glossary terms: "What does the term X mean in Python?" -> the glossary's first definition paragraph;
    * module synopses: "What is the Python module M for?" -> "The M module: <synopsis>";
    * documented functions, classes and methods (``objects`` of them, sampled by hash): "What does the
      function f() do?" -> the first sentence of its description;
    * documents: "Summarise the page <title>." -> its first paragraph's first two sentences.
    Pairs are deduplicated, kept short (answers of 4-60 words) and ordered deterministically.
    """
    pairs: list[tuple[str, str]] = []
    for d in docs:
        for term, definition in d.glossary:
            pairs.append((f"What does the term \"{term}\" mean in Python?", _clip(definition, 60)))
        for module, synopsis in d.synopses:
            if synopsis and synopsis[0].isalpha():
                lower = synopsis[0].lower() + synopsis[1:] if synopsis[1:2].islower() else synopsis
                pairs.append((f"What is the Python module {module} for?",
                              f"The {module} module: {lower}".rstrip(".") + "."))
        for kind, name, sentence in d.objects:
            call = f"{name}()" if kind not in ("class", "exception") else name
            noun = {"class": "class", "exception": "exception"}.get(kind, "function" if kind != "method" else "method")
            pairs.append((f"What does the {noun} {call} do?", sentence))
        if d.title and len(d.paragraphs) >= 3:
            pairs.append((f"Summarise the documentation page \"{d.title}\" in two sentences.",
                          _sentences(d.paragraphs[0], 2)))
    seen, out = set(), []
    for q, a in pairs:
        n = len(a.split())
        if q in seen or not 4 <= n <= 60 or not a.isascii() or "`" in a:
            continue
        seen.add(q)
        out.append((q, a))
    # Every glossary, synopsis and summary pair, and ``objects`` object pairs sampled deterministically.
    core = [p for p in out if not p[0].startswith("What does the ") or "term" in p[0]]
    rest = sorted((p for p in out if p not in core), key=lambda p: hashlib.sha1(p[0].encode()).hexdigest())
    return core + rest[:objects]


def _sentences(text: str, n: int) -> str:
    parts = re.split(r"(?<=[.?!])\s+(?=[A-Z])", text)
    return " ".join(parts[:n])


def _clip(text: str, words: int) -> str:
    out = ""
    for sentence in re.split(r"(?<=[.?!])\s+(?=[A-Z])", text):
        if out and len((out + " " + sentence).split()) > words:
            break
        out = (out + " " + sentence).strip()
    return out


# ------------------------------------------------------------------------------------------------------ main
def build(root: Path, out: Path = HERE) -> dict:
    docs = read_documents(root)
    held = next(d for d in docs if d.name == LONG_TEXT_DOC)
    rest = [d for d in docs if d.name != LONG_TEXT_DOC]
    train = [d for d in rest if not is_validation(d.name)]
    validation = [d for d in rest if is_validation(d.name)]
    validation.append(Document(held.name, held.title, held.paragraphs[LONG_TEXT_PARAGRAPHS:]))
    long_text = "\n\n".join(held.paragraphs[:LONG_TEXT_PARAGRAPHS]) + "\n"
    for name, part in (("train.txt.gz", train), ("validation.txt.gz", validation)):
        data = format_documents(part).encode()
        (out / name).write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    (out / "long_text.txt").write_text(long_text)
    pairs = instructions(train)
    (out / "instruct.txt").write_text("".join(f"[INST] {q} [/INST] {a}\n\n" for q, a in pairs))
    return {"documents": len(docs), "train_docs": len(train), "validation_docs": len(validation),
            "train_chars": sum(len(p) for d in train for p in d.paragraphs),
            "validation_chars": sum(len(p) for d in validation for p in d.paragraphs),
            "long_text_paragraphs": LONG_TEXT_PARAGRAPHS, "long_text_chars": len(long_text),
            "instruct_pairs": len(pairs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", type=Path, help="the Python 3.11 docs' reST sources (html/_sources or Doc/)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    stats = build(args.sources, args.out)
    for key, value in stats.items():
        print(f"{key:>22}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
