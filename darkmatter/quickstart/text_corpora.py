"""The quickstart's text, from Debian packages that install offline.

Pretraining (labels never used):
- Webster's Revised Unabridged Dictionary of 1913, from the Collaborative International
  Dictionary of English (`dict-gcide`): a sense a document, after its headword, with the
  literary quotations that illustrate it. GCIDE also holds definitions taken from WordNet
  (marked "[WordNet 1.5]"), the evaluation's source: only the senses marked "[1913 Webster]"
  or "[Webster 1913 Suppl.]" are kept;
- the fortune-cookie files (`fortunes`, `fortunes-min`): quotations, jokes, poems, definitions;
- the prose of Python's documentation (`python3-doc`, its reStructuredText sources): tutorials,
  the language and library references, HOWTOs. Paragraphs become documents; code, tables and
  markup are dropped.

Evaluation from another source: WordNet's noun definitions (`wordnet-base`), each labeled with
its lexicographer file ("supersense": noun.animal, noun.artifact, ...). WordNet is not in the
pretraining text, so the probe measures what transfers.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
WEBSTER = ("[1913 Webster]", "[Webster 1913 Suppl.]")
PYTHON_DOCS = sorted(Path("/usr/share/doc").glob("python3*/html/_sources"))
WORDNET = Path("/usr/share/wordnet")
# Eight supersenses of at least 2,500 synsets each, about different things (WordNet's own
# lexicographer file numbers, lexnames(5WN)).
SUPERSENSES = {4: "act", 5: "animal", 6: "artifact", 10: "communication", 13: "food",
               15: "location", 18: "person", 20: "plant"}  # fmt: skip
PER_SUPERSENSE = 400

_ROLE = re.compile(r":[\w:.+-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`open` -> open
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_{1,2}")  # `text <url>`_ -> text
_MARK = re.compile(r"``|\*\*|(?<!\w)\*(?=\w)|(?<=\w)\*(?!\w)|`_?_?|\|")


def python_doc_paragraphs(min_words: int = 8) -> Iterator[str]:
    """Prose paragraphs of Python's documentation, markup removed, one per document."""
    if not PYTHON_DOCS:
        raise SystemExit(
            "/usr/share/doc/python3*/html/_sources: missing (apt-get install python3-doc)"
        )
    for path in sorted(PYTHON_DOCS[-1].rglob("*.txt")):
        literal = False  # the paragraph after one ending in "::" is a code block
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            lines = block.splitlines()
            if not lines:
                continue
            code, literal = literal, block.rstrip().endswith("::")
            first = lines[0]
            if code and first.startswith((" ", "\t")):
                literal = True  # a code block goes on until a line that is not indented
                continue
            if first.lstrip().startswith(("..", ">>>", "$", "+-", "==", "--", "**", ":")):
                continue
            text = " ".join(ln.strip() for ln in lines)
            text = _MARK.sub("", _LINK.sub(r"\1", _ROLE.sub(r"\1", text))).rstrip(":")
            words = text.split()
            letters = sum(c.isalpha() for c in text)
            if len(words) >= min_words and letters >= 0.7 * len(text.replace(" ", "")):
                yield " ".join(words)


_PRONUNCIATION = re.compile(r"\\[^\\\n]*\\,?")  # \Af*fect"\,
_BRACKETS = re.compile(r"\[[^\[\]]*\]")  # etymologies, [Obs.], markers
_HEADWORD = re.compile(r"^([A-Za-z][^\\\n]*?) \\")


def webster_senses(min_words: int = 5) -> Iterator[str]:
    """Webster's 1913 senses from GCIDE, "Headword: text" a sense, markup removed."""
    import gzip

    if not GCIDE.is_file():
        raise SystemExit(f"{GCIDE}: missing (apt-get install dict-gcide)")
    text = gzip.decompress(GCIDE.read_bytes()).decode("utf-8", errors="replace")
    head, lines = "", list[str]()
    for line in text.splitlines():
        if match := _HEADWORD.match(line):
            head, lines = match.group(1).strip(), []
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]") and not _BRACKETS.sub("", stripped):
            block, lines = " ".join(lines), []
            if stripped not in WEBSTER or not head:
                continue
            block = _BRACKETS.sub("", _BRACKETS.sub("", _PRONUNCIATION.sub("", block)))
            words = block.replace("{", "").replace("}", "").split()
            if len(words) >= min_words:
                yield f"{head}: " + " ".join(words)
        elif stripped:
            lines.append(stripped)


def write_pretraining_jsonl(path: Path) -> int:
    """Webster's senses and Python's documentation prose as JSON lines {"text": ...} at `path`;
    the number written. The fortune files go to prepare as they are, beside it."""
    n = 0
    with path.open("w") as f:
        for doc in itertools.chain(webster_senses(), python_doc_paragraphs()):
            f.write(json.dumps({"text": doc}) + "\n")
            n += 1
    return n


def wordnet_definitions() -> dict[str, list[str]]:
    """Every noun synset's definition (its gloss without the quoted examples), by supersense."""
    data = WORDNET / "data.noun"
    if not data.is_file():
        raise SystemExit(f"{data}: missing (apt-get install wordnet-base)")
    out: dict[str, list[str]] = {name: [] for name in SUPERSENSES.values()}
    for line in data.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue  # the licence header
        fields, gloss = line.split(" | ", 1)
        name = SUPERSENSES.get(int(fields.split()[1]))
        definition = gloss.split('; "', 1)[0].strip().rstrip(";").strip()
        if name and len(definition.split()) >= 3:
            out[name].append(definition)
    return out


def wordnet_task(seed: int = 0) -> dict[str, list[str]]:
    """A balanced labeled set: PER_SUPERSENSE definitions of each supersense, drawn by `seed`."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for name, defs in wordnet_definitions().items():
        pick = sorted(rng.permutation(len(defs))[:PER_SUPERSENSE])
        texts += [defs[i] for i in pick]
        labels += [name] * len(pick)
    return {"text": texts, "label": labels}
