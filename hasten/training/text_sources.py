"""Text at hand for distillation prompts: documentation installed with packages, message catalogs, source code.

``harvest(roots)`` walks folders of installed files (site-packages, ``/usr/share/doc``, ``/usr/share/locale``) and
returns prose paragraphs and sentences (Markdown, reStructuredText and plain-text documents, the long descriptions
in ``*.dist-info/METADATA``), package records (those files' headers), FAQ-style headings that are questions,
definitions ("X is a ..."), small documented Python functions, and translated message pairs from gettext catalogs
(``*.mo``). Each piece names the document it came from (``group``), so that a split keeps a document on one side.
Paths are walked in sorted order and sampled with a seeded generator: the same files give the same text.
"""

from __future__ import annotations

import ast
import os
import random
import re
import struct
import textwrap
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path

LANGUAGES = {"fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese"}
DOC_SUFFIXES = (".md", ".rst", ".txt")
SKIPPED_NAMES = re.compile(r"(licen[cs]e|copying|copyright|notice|authors|changelog|changes|history|news|"
                           r"entry_points|top_level|requires|sources|record|installer|wheel|dependency_links)",
                           re.IGNORECASE)
MARKUP = re.compile(r"^\s*([#|>=*+`~^:.<\-]|\d+\.\s|\[|!\[|\$|>>>|\w+:\s*$)")
LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
ROLE = re.compile(r":[a-z:]+:`([^`<]+?)(?:\s*<[^>]*>)?`")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
DEFINITION = re.compile(r"^([A-Z][\w.\-]*(?: [\w.\-]+){0,3}) (?:is|are) (?:an?|the) ")
DIST_INFO = re.compile(r"-[0-9][^/]*\.dist-info$")
BOILERPLATE = re.compile(r"warranty|general public license|licensed under|copyright|all rights reserved",
                         re.IGNORECASE)
FORMAT_CODES = re.compile(r"%|\{|\}|\\|\t|&|_{2}|<[a-z]")


@dataclass(frozen=True)
class Piece:
    """One piece of text and the document it came from; ``meta`` holds what a kind needs (a record's fields, a
    catalog pair's language and English text)."""

    text: str
    group: str
    meta: tuple[tuple[str, str], ...] = ()

    def get(self, key: str, default: str = "") -> str:
        return dict(self.meta).get(key, default)


@dataclass
class TextAtHand:
    paragraphs: list[Piece] = field(default_factory=list)
    sentences: list[Piece] = field(default_factory=list)
    records: list[Piece] = field(default_factory=list)
    questions: list[Piece] = field(default_factory=list)
    definitions: list[Piece] = field(default_factory=list)
    functions: list[Piece] = field(default_factory=list)
    translations: list[Piece] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: len(items) for name, items in vars(self).items()}


def words(text: str) -> int:
    return len(text.split())


def clean_inline(text: str) -> str:
    """Markdown links and reST roles reduced to their text, emphasis marks dropped, spaces collapsed."""
    text = ROLE.sub(r"\1", LINK.sub(r"\1", text))
    text = re.sub(r"\*\*|__|(?<!\w)\*(?=\w)|(?<=\w)\*(?!\w)|``", "", text)
    return re.sub(r"\s+", " ", text).strip()


def is_prose(text: str) -> bool:
    """Mostly letters, few symbols or URLs, ends like a sentence."""
    if "http" in text or "://" in text or text.count("`") > 4 or text[-1:] not in ".!?":
        return False
    letters = sum(c.isalpha() or c == " " for c in text)
    return letters / len(text) > 0.85 and text[0].isupper()


def paragraphs_of(text: str, low: int = 35, high: int = 170) -> list[str]:
    """Prose paragraphs of ``low`` to ``high`` words from a Markdown/reST/plain document (code, tables, lists,
    headings and directives left out)."""
    found = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or any(MARKUP.match(line) for line in lines) or lines[0].startswith("    "):
            continue
        paragraph = clean_inline(" ".join(lines))
        if low <= words(paragraph) <= high and is_prose(paragraph) and not BOILERPLATE.search(paragraph):
            found.append(paragraph)
    return found


def sentences_of(paragraph: str, low: int = 8, high: int = 32) -> list[str]:
    return [s for s in SENTENCE_END.split(paragraph) if low <= words(s) <= high and is_prose(s) and "`" not in s]


def questions_of(text: str) -> list[str]:
    """Headings (Markdown ``#`` lines, reST titles with an underline) that are questions of 4 to 16 words."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        title = line.lstrip("#").strip() if line.startswith("#") else line.strip()
        underlined = i + 1 < len(lines) and re.fullmatch(r"([=\-~^*])\1{3,}", lines[i + 1].strip() or "x")
        if (line.startswith("#") or underlined) and title.endswith("?") and 4 <= words(title) <= 16:
            found.append(clean_inline(title))
    return found


def record_of(metadata: str) -> tuple[dict[str, str], str]:
    """The fields of a ``METADATA`` file's header (name, version, summary, ...) and its long description."""
    message = HeaderParser().parsestr(metadata)
    keys = {"Name": "name", "Version": "version", "Summary": "summary", "License": "license",
            "Requires-Python": "requires_python", "Author": "author", "Author-email": "author_email",
            "Home-page": "homepage", "Keywords": "keywords"}
    fields = {}
    for header, key in keys.items():
        value = re.sub(r"\s+", " ", str(message.get(header) or "")).strip()
        if value and value.upper() != "UNKNOWN" and len(value) <= 160:
            fields[key] = value
    return fields, str(message.get_payload() or "")


def functions_of(source: str, group: str, low: int = 4, high: int = 24, chars: int = 900) -> list[Piece]:
    """Module- or class-level functions of ``low`` to ``high`` lines with a docstring, as written."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("__") or not ast.get_docstring(node):
            continue
        text = textwrap.dedent(" " * node.col_offset + (ast.get_source_segment(source, node) or ""))
        lines = text.count("\n") + 1
        if low <= lines <= high and len(text) <= chars and not node.decorator_list and text.isascii():
            found.append(Piece(text.strip(), group, (("name", node.name),)))
    return found


def read_catalog(path: Path) -> list[tuple[str, str]]:
    """(original, translation) pairs of a gettext ``.mo`` file (either byte order), decoded by its charset."""
    data = path.read_bytes()
    if len(data) < 28:
        return []
    order = {0x950412DE: "<", 0xDE120495: ">"}.get(struct.unpack("<I", data[:4])[0])
    if order is None:
        return []
    count, originals, translations = struct.unpack(order + "4x4x3I", data[:20])[0:3]

    def entry(table: int, index: int) -> bytes:
        length, offset = struct.unpack(order + "2I", data[table + 8 * index : table + 8 * index + 8])
        return data[offset : offset + length]

    try:
        raw = [(entry(originals, i), entry(translations, i)) for i in range(count)]
    except struct.error:
        return []
    header = dict(raw).get(b"", b"").decode("ascii", "replace")
    match = re.search(r"charset=([\w\-]+)", header)
    charset = match.group(1) if match else "utf-8"
    pairs = []
    for original, translated in raw:
        if original and b"\x00" not in original and b"\x04" not in original:
            try:
                pairs.append((original.decode("utf-8"), translated.decode(charset)))
            except (UnicodeDecodeError, LookupError):
                continue
    return pairs


def catalog_language(path: Path) -> str | None:
    """The language of a catalog from its ``<lang>/LC_MESSAGES`` folder, if it is one of ``LANGUAGES``."""
    if path.parent.name != "LC_MESSAGES":
        return None
    return LANGUAGES.get(re.split(r"[_.@]", path.parent.parent.name)[0])


def good_message(original: str, translated: str) -> bool:
    """A whole-sentence message: 6 to 30 words each, no format codes, not left untranslated."""
    return (6 <= words(original) <= 30 and 5 <= words(translated) <= 36 and original.strip() != translated.strip()
            and not FORMAT_CODES.search(original + translated) and original[:1].isupper()
            and not re.match(r"^[A-Z]\d+:", original) and "\n" not in original.strip())


def _files(roots: list[Path]) -> list[Path]:
    found = []
    for root in roots:
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in {"__pycache__", "node_modules", ".git"})
            found.extend(Path(folder) / name for name in sorted(names))
    return found


def _group(path: Path, roots: list[Path]) -> str:
    """The document's package: the first folder under its root (``-x.y.dist-info`` dropped), then its name."""
    for root in roots:
        if path.is_relative_to(root):
            package = DIST_INFO.sub("", path.relative_to(root).parts[0])
            return f"{package}/{path.name}"
    return str(path)


def _sample(paths: list[Path], roots: list[Path], per_package: int, rng: random.Random) -> list[Path]:
    """At most ``per_package`` paths of each package, chosen at random (seeded), in sorted order."""
    by_package: dict[str, list[Path]] = {}
    for path in paths:
        by_package.setdefault(_group(path, roots).split("/")[0], []).append(path)
    chosen = [p for group in by_package.values() for p in rng.sample(group, min(per_package, len(group)))]
    return sorted(chosen)


def harvest(roots: list[str | Path], seed: int = 0, docs_per_package: int = 40, code_files: int = 400,
            catalogs_per_language: int = 40, max_bytes: int = 400_000) -> TextAtHand:
    """The text at hand under ``roots`` (folders that do not exist are skipped)."""
    rng = random.Random(seed)
    folders = [Path(r).resolve() for r in roots if Path(r).is_dir()]
    paths = _files(folders)
    docs = [p for p in paths if (p.suffix.lower() in DOC_SUFFIXES or p.name in ("README", "METADATA"))
            and not SKIPPED_NAMES.search(p.stem) and "licenses" not in p.parts]
    out, seen = TextAtHand(), set()
    for path in _sample(docs, folders, docs_per_package, rng):
        try:
            text = path.read_text(encoding="utf-8")[:max_bytes] if path.stat().st_size <= 4 * max_bytes else ""
        except (OSError, UnicodeDecodeError):
            continue
        group = _group(path, folders)
        if path.name == "METADATA":
            fields, text = record_of(text)
            if {"name", "version", "summary"} <= set(fields):
                out.records.append(Piece(fields["summary"], group, tuple(sorted(fields.items()))))
        for paragraph in paragraphs_of(text):
            if paragraph in seen:  # the same README installed by several packages
                continue
            seen.add(paragraph)
            out.paragraphs.append(Piece(paragraph, group))
            out.sentences.extend(Piece(s, group) for s in sentences_of(paragraph))
            term = DEFINITION.match(paragraph)
            if term and "`" not in term.group(1):
                out.definitions.append(Piece(paragraph, group, (("term", term.group(1)),)))
        out.questions.extend(Piece(q, group) for q in questions_of(text))
    sources = [p for p in paths if p.suffix == ".py" and "test" not in p.name]
    for path in sorted(rng.sample(sources, min(code_files, len(sources)))):
        try:
            out.functions.extend(functions_of(path.read_text(encoding="utf-8"), _group(path, folders)))
        except (OSError, UnicodeDecodeError):
            continue
    catalogs: dict[str, list[Path]] = {}
    for path in paths:
        language = catalog_language(path) if path.suffix == ".mo" else None
        if language and not path.stem.startswith("iso_"):  # iso-codes: place and language names, not sentences
            catalogs.setdefault(language, []).append(path)
    for language, files in sorted(catalogs.items()):
        for path in sorted(rng.sample(files, min(catalogs_per_language, len(files)))):
            group = f"catalog/{path.stem}"  # one program's messages, in every language, stay on one side
            out.translations.extend(Piece(" ".join(t.split()), group, (("language", language), ("english", o.strip())))
                                    for o, t in read_catalog(path) if good_message(o, t))
    return out
