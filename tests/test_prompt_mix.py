"""``hasten train prompts``: distillation prompts for every bench category from text at hand, on a tiny fixture."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from hasten.cli import main as cli_main
from hasten.errors import HastenError
from hasten.training import prompt_mix, text_sources
from hasten.training.prompt_mix import BENCH_PROMPTS, CATEGORIES, bench_ngrams, build_mix, ngrams, read_shared

PROSE = [
    "Widgetry is a small library that draws charts in the terminal. It reads numbers from standard input, "
    "scales them to the width of the window and prints bars made of block characters. Colours follow the "
    "theme of the terminal, and the output can be saved as plain text for reports sent by email. Large inputs are "
    "read in pieces, so that a chart of a million numbers still appears within a second on an ordinary laptop.",
    "The Parser class reads configuration files written in a simple key and value format. Comments start with "
    "a hash sign and run to the end of the line. Sections group related keys, and a key may appear in several "
    "sections with different values. Unknown keys are kept, so that newer files still load in older versions. "
    "Errors name the file and the line where they were found, and the parser stops at the first one it meets.",
    "Caching keeps the results of slow lookups in memory for a few minutes. When the same question is asked "
    "again, the stored answer is returned at once instead of asking the server. The cache forgets the oldest "
    "entries first when it grows beyond the limit that the user has chosen in the settings. Entries can also be "
    "removed by hand, for example after the data on the server has changed and the old answer is wrong.",
]
# A bench prompt's own text hidden in the documentation: every prompt made from it must be dropped.
BENCH_TEXT = json.loads(BENCH_PROMPTS.read_text().splitlines()[12])["turns"][0].split("\n\n", 1)[1]


def write_mo(path: Path, pairs: list[tuple[str, str]], charset: str = "ISO-8859-1") -> None:
    """A gettext catalog (little-endian .mo) holding ``pairs`` and a header naming ``charset``."""
    entries = sorted([("", f"Content-Type: text/plain; charset={charset}\n"), *pairs])
    originals = [o.encode("utf-8") for o, _ in entries]
    translations = [t.encode(charset) for _, t in entries]
    count, start = len(entries), 28 + 16 * len(entries)
    tables, blob = [], b""
    for strings in (originals, translations):
        table = []
        for s in strings:
            table.append((len(s), start + len(blob)))
            blob += s + b"\0"
        tables.append(table)
    header = struct.pack("<7I", 0x950412DE, 0, count, 28, 28 + 8 * count, 0, 0)
    body = b"".join(struct.pack("<2I", *e) for table in tables for e in table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + body + blob)


@pytest.fixture(scope="module")
def fixture_docs(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("docs")
    for index, name in enumerate(("widgetry", "parsekit", "cachette", "benchcopy")):
        package = root / name
        package.mkdir()
        text = BENCH_TEXT if name == "benchcopy" else PROSE[index]
        (package / "README.md").write_text(f"# {name}\n\n{text}\n\n## Why is the output empty sometimes?\n\n"
                                           "```\ncode block\n```\n")
        (package / "tools.py").write_text(
            "def scale(values, width):\n    \"\"\"Scale values to fit into width columns.\"\"\"\n"
            "    top = max(values) or 1\n    return [round(v * width / top) for v in values]\n")
        info = root / f"{name}-1.2.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.0\nSummary: Tools for "
                                       f"{name} work.\nLicense: MIT\nRequires-Python: >=3.9\n\n{text}\n")
    write_mo(root / "locale" / "fr" / "LC_MESSAGES" / "widgetry.mo", [
        ("The file could not be opened for reading.", "Le fichier n'a pas pu être ouvert en lecture."),
        ("Press any key to continue with the installation.", "Appuyez sur une touche pour continuer l'installation."),
        ("Too short", "Trop court"),
    ])
    shared = root / "shared"
    shared.mkdir()
    rows = {
        "alpacaeval_dev": [{"id": f"alpaca/{i}", "prompt": p} for i, p in enumerate(
            ["What is the tallest mountain in Africa?", "Write a poem about autumn leaves.",
             "Why do cats purr when they are happy?", "Plan a birthday party for a seven year old."])],
        "gsm8k_dev": [{"id": "gsm/0", "prompt": "Tom has 3 boxes of 12 pencils. How many pencils does he have?",
                       "answer": "He has 3 * 12 = <<3*12=36>>36 pencils.\n#### 36"}],
        "mbpp": [{"id": "mbpp/1", "prompt": "Write a function to add two numbers.",
                  "code": "def add(a, b):\r\n    return a + b", "test_list": ["assert add(1, 2) == 3"]}],
    }
    files = []
    for stem, items in rows.items():
        files.append(shared / f"{stem}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in items))
    return root, files


def _build(fixture_docs, seed: int = 0, held_out: float = 0.5):
    root, files = fixture_docs
    text = text_sources.harvest([root], seed=seed)
    return text, build_mix(text, read_shared(files), per_category=40, held_out=held_out, seed=seed)


def test_every_category_is_built_from_the_fixture(fixture_docs):
    text, (train, held, summary) = _build(fixture_docs)
    assert len(text.records) == 4 and text.functions and len(text.translations) == 2  # "Too short" is no sentence
    assert {p.get("language") for p in text.translations} == {"French"}
    assert "Le fichier n'a pas pu être ouvert en lecture." in [p.text for p in text.translations]  # latin-1 decoded
    rows = train + held
    assert {r["category"] for r in rows} == set(CATEGORIES)
    assert all(set(r) == {"id", "category", "prompt", "kind", "source"} for r in rows)
    assert len({r["id"] for r in rows}) == len(rows) and len({r["prompt"] for r in rows}) == len(rows)
    assert summary["train"] == len(train) and summary["heldout"] == len(held) > 0


def test_no_prompt_shares_text_with_the_bench(fixture_docs):
    _, (train, held, summary) = _build(fixture_docs)
    forbidden = bench_ngrams()
    assert summary["sharing_text_with_bench"] > 0  # the copied bench paragraph was there, and was dropped
    assert not any(ngrams(r["prompt"]) & forbidden for r in train + held)
    assert not any("benchcopy" in r["source"] and r["kind"] in ("passage", "rewrite", "fields") for r in train + held)
    words = BENCH_TEXT.split()
    assert not any(" ".join(words[:6]) in r["prompt"] for r in train + held)


def test_split_is_by_source_and_shared_prompts_stay_in_train(fixture_docs):
    _, (train, held, _) = _build(fixture_docs)
    assert not {r["source"] for r in train} & {r["source"] for r in held}
    shared_sources = {"alpaca/0", "alpaca/1", "alpaca/2", "alpaca/3", "mbpp/1"}
    assert not any(r["source"] in shared_sources for r in held)
    assert any(r["source"] in shared_sources for r in train)
    assert {r["kind"] for r in held} <= {"to-other", "to-english", "passage", "record", "signature", "pairs",
                                         "fields", "package", "rewrite", "faq", "term", "function", "worked"}


def test_the_mix_is_deterministic_and_seeded(fixture_docs):
    _, first = _build(fixture_docs, seed=0)
    _, again = _build(fixture_docs, seed=0)
    _, other = _build(fixture_docs, seed=1)
    assert first == again
    assert [r["prompt"] for r in first[0] + first[1]] != [r["prompt"] for r in other[0] + other[1]]


def test_caps_and_bad_settings(fixture_docs):
    root, files = fixture_docs
    text = text_sources.harvest([root])
    train, held, _ = build_mix(text, read_shared(files), per_category=2, held_out=0.0)
    assert not held and all(sum(r["category"] == c for r in train) <= 2 for c in CATEGORIES)
    with pytest.raises(HastenError, match="--held-out"):
        build_mix(text, read_shared(files), held_out=1.0)
    with pytest.raises(HastenError, match="not found"):
        read_shared([root / "missing.jsonl"])


def test_cli_writes_the_shared_format(fixture_docs, tmp_path):
    root, files = fixture_docs
    out = tmp_path / "mix"
    assert cli_main(["train", "prompts", "--out", str(out), "--docs", str(root), "--shared", *map(str, files),
                     "--per-category", "6", "--held-out", "0.3"]) in (0, None)
    rows = [json.loads(line) for name in ("train.jsonl", "heldout.jsonl")
            for line in (out / name).read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == summary["train"] + summary["heldout"] and {r["category"] for r in rows} == set(CATEGORIES)
    assert prompt_mix.DEFAULT_OUT == "out/prompt-mix"


def test_text_filters():
    assert text_sources.paragraphs_of("# Title\n\n" + PROSE[0] + "\n\n- a list item that is short\n") == [PROSE[0]]
    assert text_sources.paragraphs_of("See https://example.com for the full manual of this tool. " * 6) == []
    assert text_sources.questions_of("Why is it slow?\n===============\n\n# How do I install the tool?\n") == [
        "Why is it slow?", "How do I install the tool?"]
    assert not text_sources.good_message("Cannot open %s for reading now", "Impossible d'ouvrir %s en lecture")
