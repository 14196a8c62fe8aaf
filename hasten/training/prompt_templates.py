"""Prompt builders for each bench category, from text at hand (``text_sources``) and the shared prompt files.

Each builder returns ``Built`` prompts of one category, several *kinds* (ways of making a prompt), each naming the
document or shared prompt it came from (``source``, the unit of the train / held-out split) and whether it is a
shared file's prompt or made from one (``shared``: the shipped drafters were trained on those, so they are never
held out). The wording is hasten's own: ``prompt_mix`` drops any prompt sharing six words in a row with a bench
prompt.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from hasten.training.text_sources import LANGUAGES, Piece, TextAtHand, words

STOPWORDS = {"The", "This", "That", "These", "It", "If", "In", "On", "For", "When", "You", "We", "A", "An", "To",
             "As", "By", "With", "Note", "See", "Each", "All", "Some", "Any", "Its", "Our", "Your", "They", "There"}
QUESTION_START = re.compile(r"^(what|why|how|who|when|where|which|is|are|can|could|does|do|did|should|would|will)\b",
                            re.IGNORECASE)


@dataclass(frozen=True)
class Built:
    category: str
    kind: str
    prompt: str
    source: str
    shared: bool = False


def _pick(rng: random.Random, options: list[str] | tuple[str, ...]) -> str:
    return options[rng.randrange(len(options))]


def _code(text: str) -> str:
    return f"```python\n{text}\n```"


def _without_docstring(code: str) -> str:
    return re.sub(r'\n(\s*)(?:r?"""[\s\S]*?"""|r?\'\'\'[\s\S]*?\'\'\')\n', "\n", code, count=1)


def translation(text: TextAtHand, rng: random.Random) -> list[Built]:
    to_other = ('Translate the following sentence into {lang}:\n\n{s}', 'How would you say this in {lang}? "{s}"',
                "Please give a {lang} translation of this sentence: {s}", "{s}\n\nTranslate the sentence above into "
                "{lang}.", 'Translate to {lang}, keeping technical terms as they are: "{s}"')
    to_english = ("Translate this {lang} text into English:\n\n{s}", 'What does this {lang} message mean in English? '
                  '"{s}"', "Give an English translation of: {s}", '"{s}"\n\nPut the {lang} text above into English.')
    languages = sorted(LANGUAGES.values())
    built = [Built("translation", "to-other", _pick(rng, to_other).format(lang=_pick(rng, languages), s=p.text),
                   p.group) for p in text.sentences]
    built += [Built("translation", "to-english", _pick(rng, to_english).format(lang=p.get("language"), s=p.text),
                    p.group) for p in text.translations]
    return built


def _passages(text: TextAtHand, low: int = 60, high: int = 230) -> list[Piece]:
    """Paragraphs of ``low`` words or more, or two neighbours of one document joined under ``high`` words."""
    out, previous = [], None
    for piece in text.paragraphs:
        if words(piece.text) >= low:
            out.append(piece)
        elif previous is not None and previous.group == piece.group and words(previous.text + piece.text) <= high:
            out.append(Piece(f"{previous.text}\n\n{piece.text}", piece.group))
        previous = piece
    return out


def summarization(text: TextAtHand, rng: random.Random) -> list[Built]:
    templates = ("Summarize this passage in {n} sentences.\n\n{p}", "Give the key points of the text below as {n} "
                 "bullet points.\n\n{p}", "In one sentence, what is the main point of this paragraph?\n\n{p}",
                 "Write a short summary, at most {n} sentences, of this documentation excerpt:\n\n{p}",
                 "{p}\n\nSum up the text above for a busy reader.", "What are the most important ideas in the "
                 "following text? Keep it brief.\n\n{p}")
    return [Built("summarization", "passage", _pick(rng, templates).format(n=_pick(rng, ("two", "three")), p=p.text),
                  p.group) for p in _passages(text)]


def _terms(passage: str) -> list[str]:
    """Capitalised terms inside sentences (not sentence starts), or long words when there are none."""
    found = []
    for sentence in re.split(r"(?<=[.!?])\s+", passage):
        for match in re.finditer(r"(?<=\s)[A-Z][A-Za-z0-9]+(?:\s[A-Z][A-Za-z0-9]+)*", sentence):
            if match.group(0) not in STOPWORDS and match.group(0) not in found:
                found.append(match.group(0))
    return found or sorted({w.strip(".,;:()") for w in passage.split() if len(w.strip(".,;:()")) >= 9})[:5]


def rag(text: TextAtHand, rng: random.Random) -> list[Built]:
    layouts = ("Context:\n{p}\n\nAnswer using only the context above: {q}", "Read the text below and answer the "
               "question.\n\nText: {p}\n\nQuestion: {q}", "{p}\n\nBased only on this text: {q}",
               "Document:\n{p}\n\nQ: {q}")
    questions = ("What does the passage say about {t}?", "According to the text, what is {t} and why does it "
                 "matter?", "Which facts does the passage give about {t}? Answer with a short list.",
                 "In one sentence, what does the text tell us about {t}?", "How is {t} described here, and what "
                 "is it compared with, if anything?")
    passages = _passages(text, low=45)
    built = []
    for i, passage in enumerate(passages):
        terms = _terms(passage.text)
        if not terms:
            continue
        if rng.random() < 0.15:  # a question the passage cannot answer: a term from another document
            other = _terms(passages[(i + 1 + rng.randrange(len(passages) - 1)) % len(passages)].text) or terms
            question = f"Does the text mention {_pick(rng, other)}? If it does not, say so plainly."
        else:
            question = _pick(rng, questions).format(t=_pick(rng, terms))
        built.append(Built("rag", "passage", _pick(rng, layouts).format(p=passage.text, q=question), passage.group))
    return built


def _record_prose(fields: dict[str, str]) -> str:
    parts = [f"{fields['name']} {fields['version']} is a Python package: {fields['summary'].rstrip('.')}."]
    if "author" in fields:
        parts.append(f"It is written by {fields['author']}.")
    if "license" in fields:
        parts.append(f"Its licence is {fields['license']}.")
    if "requires_python" in fields:
        parts.append(f"It needs Python {fields['requires_python']}.")
    if "homepage" in fields:
        parts.append(f"Home page: {fields['homepage']}.")
    return " ".join(parts)


def structured(text: TextAtHand, shared: dict[str, list[dict]], rng: random.Random) -> list[Built]:
    built = []
    for record in text.records:
        fields = dict(record.meta)
        keys = ", ".join(k for k in ("name", "version", "summary", "author", "license", "requires_python",
                                     "homepage", "keywords") if k in fields or rng.random() < 0.2)
        if rng.random() < 0.5:
            raw = "\n".join(f"{k.replace('_', '-').title()}: {v}" for k, v in sorted(fields.items()))
            prompt = f"Convert this package record into a JSON object with the keys {keys}. Reply with the JSON " \
                     f"only.\n\n{raw}"
        else:
            prompt = f"Read the description below and return a JSON object with these keys: {keys}. Use null for " \
                     f"anything it does not state.\n\nDescription: {_record_prose(fields)}"
        built.append(Built("structured", "record", prompt, record.group))
    for function in text.functions:
        built.append(Built("structured", "signature", 'Describe this function as a JSON object with the keys "name", '
                           '"parameters" (a list of parameter names) and "purpose" (one sentence). Output only the '
                           f"JSON.\n\n{_code(function.text)}", function.group))
    by_catalog: dict[tuple[str, str], list[Piece]] = {}
    for piece in text.translations:
        by_catalog.setdefault((piece.group, piece.get("language")), []).append(piece)
    for (group, language), pieces in sorted(by_catalog.items()):
        for start in range(0, min(len(pieces), 12) - 2, 3):
            lines = "\n".join(f"- {p.get('english')} => {p.text}" for p in pieces[start : start + 3])
            built.append(Built("structured", "pairs", f"Here are interface messages and their {language} "
                               f"translations. Return them as a JSON array of objects with the keys \"english\" and "
                               f"\"{language.lower()}\".\n\n{lines}", group))
    fields = ('Return a JSON object for the text below with the keys "topic", "audience" and "key_points" (a list of '
              "short strings).\n\n{p}", "List the tools, libraries, products or people named in this paragraph as a "
              "JSON array of strings, and nothing else.\n\n{p}")
    built += [Built("structured", "fields", _pick(rng, fields).format(p=p.text), p.group) for p in text.paragraphs]
    built += [Built("structured", "quantities", "Write the quantities given in this word problem as a JSON object, "
                    f"one key per quantity with its number as the value. Do not solve it.\n\n{row['prompt']}",
                    row["id"], shared=True) for row in shared.get("gsm8k_dev", [])]
    return built


def is_question(prompt: str) -> bool:
    return prompt.rstrip().endswith("?") and bool(QUESTION_START.match(prompt)) and words(prompt) <= 30


def chat(text: TextAtHand, shared: dict[str, list[dict]], rng: random.Random) -> list[Built]:
    built = [Built("chat", "request", row["prompt"], row["id"], shared=True)
             for row in shared.get("alpacaeval_dev", []) if not is_question(row["prompt"])]
    about = ("Compose a quick note recommending {name} to a teammate; the package describes itself as "
             '"{summary}"', 'Draft a two-paragraph newsletter note announcing that {name} '
             '{version} is out. Its description: "{summary}"', 'My colleague asks what {name} is for. Its '
             'description says: "{summary}" How could I explain it to someone who does not program?',
             "Give me three tips for getting started with {name} ({summary}).")
    built += [Built("chat", "package", _pick(rng, about).format(**dict(r.meta)), r.group) for r in text.records]
    rewrites = ("Rewrite this paragraph in a friendlier, more casual tone:\n\n{p}", "Turn this paragraph into a short "
                "email to my team:\n\n{p}", "Explain this paragraph to a friend who is not technical:\n\n{p}")
    built += [Built("chat", "rewrite", _pick(rng, rewrites).format(p=p.text), p.group) for p in text.paragraphs]
    return built


def qa(text: TextAtHand, shared: dict[str, list[dict]], rng: random.Random) -> list[Built]:
    built = [Built("qa", "question", row["prompt"], row["id"], shared=True)
             for row in shared.get("alpacaeval_dev", []) if is_question(row["prompt"])]
    built += [Built("qa", "faq", f"{q.text} Answer briefly.", q.group) for q in text.questions]
    terms = ("What is {t}? Answer in two or three sentences.", "Explain what {t} is and what it is used for.",
             "In a short paragraph, what is {t}?")
    built += [Built("qa", "term", _pick(rng, terms).format(t=d.get("term")), d.group) for d in text.definitions
              if d.get("term").split()[0] not in STOPWORDS]
    built += [Built("qa", "package", f"What is the Python package {r.get('name')} used for, and when would you "
                    "choose it? Answer in a few sentences.", r.group) for r in text.records]
    return built


def code(text: TextAtHand, shared: dict[str, list[dict]], rng: random.Random) -> list[Built]:
    built = []
    for row in shared.get("mbpp", []):
        tests = row.get("test_list") or []
        check = f" Your code should pass this test:\n\n{tests[0]}" if tests and rng.random() < 0.5 else ""
        built.append(Built("code", "task", row["prompt"] + check, row["id"], shared=True))
        if row.get("code") and len(row["code"]) <= 900:
            built.append(Built("code", "mbpp-code", "Explain what this function does, step by step:\n\n"
                               + _code(row["code"].replace("\r\n", "\n").strip()), row["id"], shared=True))
    tasks = ("Explain what this Python function does:\n\n{c}", "Add type hints and a short docstring to this "
             "function:\n\n{bare}", "Write two pytest tests for this function:\n\n{c}", "Rewrite this function in a "
             "simpler way without changing what it does:\n\n{c}", "Is there an edge case this function does not "
             "handle? Explain, then show a fixed version.\n\n{c}")
    for function in text.functions:
        template = _pick(rng, tasks)
        built.append(Built("code", "function", template.format(c=_code(function.text), bare=_code(
            _without_docstring(function.text))), function.group))
    return built


def _worked(answer: str) -> tuple[str, str, list[str]]:
    """A GSM8K worked answer without its ``<<...>>`` annotations, its final answer, and its calculations."""
    calculations = re.findall(r"<<([^=<>]+)=[^<>]*>>", answer)
    body, _, final = answer.partition("####")
    return re.sub(r"<<[^<>]*>>", "", body).strip(), final.strip(), calculations


def math(shared: dict[str, list[dict]], rng: random.Random) -> list[Built]:
    built = []
    suffixes = ("", " Explain each step.", " Give the final answer on its own line.", " Think it through before "
                "you answer, one step at a time.")
    for row in shared.get("gsm8k_dev", []):
        built.append(Built("math", "problem", row["prompt"] + _pick(rng, suffixes), row["id"], shared=True))
        if not row.get("answer"):
            continue
        solution, final, calculations = _worked(row["answer"])
        options = [f"Here is a worked solution to a word problem:\n\n{solution}\n\nCheck every calculation and say "
                   f"whether the final answer, {final}, is right.",
                   f"Explain in plain words what each line of this calculation does:\n\n{solution}"]
        if calculations:
            listed = "\n".join(calculations)
            longest = max(calculations, key=len).replace("*", " * ").replace("/", " / ")
            options += [f"Write a short word problem that these calculations solve, then solve it:\n\n{listed}",
                        f"What is {' '.join(longest.split())}? Work it out one operation at a time."]
        built.append(Built("math", "worked", _pick(rng, options), row["id"]))
    return built
