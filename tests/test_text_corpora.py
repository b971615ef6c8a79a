"""The quickstart's text: what is kept from Webster's dictionary (never GCIDE's WordNet
entries, the evaluation's source), Python's documentation read as prose, and the WordNet task."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from darkmatter.quickstart import text_corpora as tc

GCIDE_SAMPLE = """\
Affect \\Af*fect"\\, v. t. [imp. & p. p. {Affected}.] [L. affectus.]
   1. To act upon; to produce an effect or change upon.
      [1913 Webster]

            The climate affected their health and spirits.
                                                  --Macaulay.
      [1913 Webster]

   2. To feign or assume; to pretend to have.
      [WordNet 1.5]

Aardwolf \\Aard"wolf`\\, n. [D., earth wolf.] (Zool.)
   A carnivorous mammal of South Africa, resembling a small hyena.
   [1913 Webster]
"""


def test_webster_senses_leave_out_wordnet_and_markup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gcide.dict.dz"
    path.write_bytes(gzip.compress(GCIDE_SAMPLE.encode()))
    monkeypatch.setattr(tc, "GCIDE", path)
    assert list(tc.webster_senses()) == [
        # The headword line's own words stay in its first sense (its pronunciation goes).
        "Affect: Affect v. t. 1. To act upon; to produce an effect or change upon.",
        "Affect: The climate affected their health and spirits. --Macaulay.",
        "Aardwolf: Aardwolf n. (Zool.) A carnivorous mammal of South Africa, resembling a small hyena.",
    ]


@pytest.mark.skipif(not tc.PYTHON_DOCS, reason="python3-doc is not installed (make corpora)")
def test_python_docs_are_prose() -> None:
    paragraphs = list(tc.python_doc_paragraphs())
    assert len(paragraphs) > 10_000
    for p in paragraphs:
        assert len(p.split()) >= 8 and "``" not in p and ":func:" not in p, p
        assert not p.startswith((">>>", "..")), p
    assert any(p.startswith("Classes provide a means of bundling data") for p in paragraphs)


@pytest.mark.skipif(not (tc.WORDNET / "data.noun").is_file(), reason="wordnet-base missing")
def test_wordnet_task_is_balanced_and_drawn_by_its_seed() -> None:
    task = tc.wordnet_task()
    assert sorted(set(task["label"])) == sorted(tc.SUPERSENSES.values())
    assert all(task["label"].count(n) == tc.PER_SUPERSENSE for n in tc.SUPERSENSES.values())
    assert len(set(task["text"])) > 0.99 * len(task["text"])  # a few synsets share a gloss
    assert tc.wordnet_task() == task and tc.wordnet_task(seed=1) != task
    animals = [t for t, n in zip(task["text"], task["label"], strict=True) if n == "animal"]
    assert not any('"' in t for t in animals)  # the quoted examples are cut off
