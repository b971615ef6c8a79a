"""Tokenizers for text datasets: training prepare's BERT-style WordPiece tokenizer, loading and
checking a given one (the SPECIAL_NAMES tokens, [CLS] ... [SEP] wrapping by TemplateProcessing),
the config files beside it, and the per-process copy that workers encode with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from darkmatter import storage
from darkmatter.data_pipeline.manifest import SPECIAL_NAMES, SPECIAL_TOKENS, PrepareError


def train_tokenizer(
    documents: Callable[[str], Iterable[str]], vocab_size: int, lowercase: bool = True
) -> Any:
    """A BERT-style WordPiece tokenizer trained on a stream of documents, deterministically:
    `documents(name)` is called twice, for a pass named "alphabet" (continuing_alphabet) and
    one named "tokenizer" (the training), and must give the same documents both times."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer

    seeded = continuing_alphabet(documents("alphabet"), lowercase)

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, *seeded], show_progress=False
    )
    tok.train_from_iterator(documents("tokenizer"), trainer=trainer)
    tok = _unmark(tok, seeded)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")],
    )
    return tok


def continuing_alphabet(documents: Iterable[str], lowercase: bool = True) -> list[str]:
    """ "##c" for every character c that follows another inside a word of the documents.

    The trainer gives these tokens ids in hash-map order, which changes from process to process,
    and breaks ties between merges of equal count by id, so the same documents can give another
    vocabulary (huggingface/tokenizers#1794). Given to train_tokenizer, they get fixed ids first
    and training is deterministic (train_tokenizer does both passes).
    """
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre = pre_tokenizers.BertPreTokenizer()
    chars: set[str] = set()
    for doc in documents:
        for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(doc)):
            chars.update(word[1:])
    return ["##" + c for c in sorted(chars)]


def _unmark(tok: Any, tokens: Sequence[str]) -> Any:
    """The tokenizer with `tokens` kept in the vocabulary but no longer special added tokens."""
    from tokenizers import Tokenizer

    doc = json.loads(tok.to_str())
    drop = set(tokens)
    doc["added_tokens"] = [t for t in doc["added_tokens"] if t["content"] not in drop]
    return Tokenizer.from_str(json.dumps(doc))


def special_token_ids(tok: Any, url: str) -> dict[str, int]:
    """The tokenizer's id of each SPECIAL_NAMES token, or PrepareError naming the missing ones."""
    ids = {name: tok.token_to_id(token) for name, token in SPECIAL_NAMES.items()}
    missing = [SPECIAL_NAMES[name] for name, i in ids.items() if i is None]
    if missing:
        raise PrepareError(
            f"{url}: tokenizer lacks special token(s) {' '.join(missing)}, "
            "which the text objectives need"
        )
    return ids


def load_tokenizer(url: str) -> Any:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(storage.read_bytes(url).decode())
    except FileNotFoundError:
        raise PrepareError(f"tokenizer not found: {url}") from None
    except Exception as e:  # the Rust side raises plain Exception on a malformed file
        raise PrepareError(f"{url}: not a tokenizers tokenizer.json: {e}") from None
    special_token_ids(tok, url)
    ids = tok.encode("x").ids
    if not ids or ids[0] != tok.token_to_id("[CLS]") or ids[-1] != tok.token_to_id("[SEP]"):
        raise PrepareError(f"{url}: tokenizer does not wrap text in [CLS] ... [SEP]")
    return tok


def tokenizer_configs(lowercase: bool) -> dict[str, bytes]:
    """The small files that let `transformers` load the folder like a BERT tokenizer."""
    names = ["pad", "unk", "cls", "sep", "mask"]
    specials = {f"{n}_token": t for n, t in zip(names, SPECIAL_TOKENS, strict=True)}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "do_lower_case": lowercase, **specials}
    return {
        "tokenizer_config.json": json.dumps(config, indent=1).encode(),
        "special_tokens_map.json": json.dumps(specials, indent=1).encode(),
    }


_worker_tokenizer: tuple[str, Any] | None = None  # (sha256, Tokenizer), one per process


def tokenizer_for(url: str, sha: str) -> Any:
    """The run's tokenizer, read once per process and checked against the plan's sha256."""
    global _worker_tokenizer
    if _worker_tokenizer is None or _worker_tokenizer[0] != sha:
        from tokenizers import Tokenizer

        data = storage.read_bytes(url)
        if hashlib.sha256(data).hexdigest() != sha:
            raise PrepareError(f"{url} changed while prepare was running")
        _worker_tokenizer = (sha, Tokenizer.from_str(data.decode()))
    return _worker_tokenizer[1]
