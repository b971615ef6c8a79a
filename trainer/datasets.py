"""The run's data: its sources resolved to datasets, and what the model must know of them.

A source (data.url, or each of data.sources) is either a dataset with a manifest.json (written
by `darkmatter prepare` or `darkmatter index`) or raw files: WebDataset tar shards written by
other tools, jsonl, Parquet or text, named by a path, glob, brace range or s3:// prefix. Raw
files are indexed in place at the start of the run, into RUN_DIR/data/<source name>/ (the
files themselves are never copied; an index whose listing has not changed is reused, one that
grew gets a new manifest version). Every rank resolves the same way and gets the same manifest:
indexing is a pure function of the listing, and its manifest is written atomically.

All sources share one modality and, for text, one tokenizer: data.tokenizer if given (every
prepared source's own tokenizer.json must then be byte-identical to it), else the first
source's. Text read raw (.txt members, jsonl, Parquet, text files) is tokenized on the fly with
it, into the same ids a prepared shard holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from darkmatter import storage
from darkmatter.data_pipeline.manifest import MANIFEST, SPECIAL_NAMES, Manifest, PrepareError
from darkmatter.trainer.config import Config, data_sources

log = logging.getLogger("darkmatter.data")


@dataclass(frozen=True)
class Source:
    """A source of the run, resolved: `url` holds a manifest.json."""

    name: str
    url: str
    weight: float
    manifest: Manifest


def resolve_sources(cfg: Config) -> list[Source]:
    """Every source of the run as a dataset URL with its manifest (raw files indexed first)."""
    out = []
    for src in data_sources(cfg.data):
        storage.check_bucket(src.url)
        url = src.url
        if not _has_manifest(url):
            from darkmatter.data_pipeline import index

            folder = Path(cfg.train.run_dir) / "data" / src.name
            log.info("%s: no %s there: indexing it in place into %s", url, MANIFEST, folder)
            try:
                url = index.ensure_manifest(src.url, str(folder), fmt=src.format,
                                            text_field=src.text_field)  # fmt: skip
            except PrepareError as e:
                raise PrepareError(
                    f"{src.url}: no {MANIFEST} there (run `darkmatter prepare` or `darkmatter "
                    f"index`), and it could not be indexed in place: {e}"
                ) from None
        out.append(Source(src.name, url, src.weight, Manifest.load(url)))
    modalities = {s.manifest.modality for s in out}
    if len(modalities) > 1:
        which = ", ".join(f"{s.name}: {s.manifest.modality}" for s in out)
        raise ValueError(f"data.sources: the sources hold different modalities ({which})")
    return out


def _has_manifest(url: str) -> bool:
    try:
        return storage.exists(storage.join(url, MANIFEST))
    except (ValueError, OSError):  # a glob or brace pattern is no folder
        return False


def dataset_meta(cfg: Config, sources: list[Source]) -> dict[str, Any]:
    """What the model needs to know of the data: modality, sample count and, for text, the
    vocabulary size, the tokenizer's URL and its special-token ids ({"pad": id, ...})."""
    modality = sources[0].manifest.modality
    meta: dict[str, Any] = {
        "modality": modality,
        "num_samples": sum(s.manifest.num_samples for s in sources),
    }
    if modality != "text":
        return meta
    tok_url, tok_json = _tokenizer(cfg, sources)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok_json.decode())
    actual = {name: tok.token_to_id(token) for name, token in SPECIAL_NAMES.items()}
    missing = sorted(name for name, i in actual.items() if i is None)
    if missing:
        raise ValueError(
            f"{tok_url}: the tokenizer has no {', '.join(SPECIAL_NAMES[m] for m in missing)} "
            f"token (the text objectives need {', '.join(SPECIAL_NAMES.values())})"
        )
    for s in sources:
        # A manifest without ids recorded (the defaults) of a dataset prepared with another
        # tokenizer would otherwise train with the wrong ids without a word.
        if s.manifest.tokenizer and dict(s.manifest.special_tokens or {}) != actual:
            raise ValueError(
                f"{storage.join(s.url, MANIFEST)}: special_tokens {s.manifest.special_tokens} "
                f"disagree with {tok_url} {actual}: prepare the dataset again"
            )
    meta.update(vocab_size=tok.get_vocab_size(), tokenizer_url=tok_url, special_tokens=actual)
    return meta


def _tokenizer(cfg: Config, sources: list[Source]) -> tuple[str, bytes]:
    """(URL, bytes) of the run's tokenizer.json; every prepared source must use the same one."""
    given = cfg.data.tokenizer
    if given:
        url = given if given.endswith(".json") else storage.join(given, "tokenizer.json")
        try:
            chosen = (url, storage.read_bytes(url))
        except FileNotFoundError:
            raise ValueError(f"data.tokenizer: no tokenizer.json at {url}") from None
    else:
        own = [s for s in sources if s.manifest.tokenizer]
        if not own:
            names = ", ".join(s.url for s in sources)
            raise ValueError(
                f"data.tokenizer: {names} holds raw text and names no tokenizer: set "
                "data.tokenizer to a tokenizer.json or a save_pretrained folder (train one with "
                "`darkmatter prepare INPUTS --out DIR --tokenizer-only`)"
            )
        url = storage.join(own[0].url, own[0].manifest.tokenizer or "")
        chosen = (url, storage.read_bytes(url))
    for s in sources:
        if s.manifest.tokenizer:
            theirs = storage.join(s.url, s.manifest.tokenizer)
            if storage.read_bytes(theirs) != chosen[1]:
                raise ValueError(
                    f"{theirs}: source {s.name!r} was prepared with another tokenizer than "
                    f"{chosen[0]}: every source of a run must share one"
                )
    return chosen


def text_spec(meta: dict[str, Any]) -> Any:
    """The reader's on-the-fly tokenization settings for a text run (None for other data)."""
    if meta["modality"] != "text":
        return None
    from darkmatter.data_pipeline.reader.options import TextSpec

    return TextSpec(
        tokenizer_json=storage.read_bytes(meta["tokenizer_url"]).decode(),
        cls_id=int(meta["special_tokens"]["cls"]),
        sep_id=int(meta["special_tokens"]["sep"]),
    )


__all__ = ["PrepareError", "Source", "dataset_meta", "resolve_sources", "text_spec"]
