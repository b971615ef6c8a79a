"""`darkmatter prepare`: turn text, image, audio or video inputs into WebDataset shards plus a
manifest.

Algorithm:
  1. Inputs. Expand the inputs (local or s3:// files, or folders walked in sorted order of
     full paths, one level listed at a time; dotfiles and foreign suffixes in folders are
     skipped) into the ordered stream of supported files with their sizes and versions (mtime
     or ETag):
       text:  .txt and extension-less files (a document per non-empty line, or fortune-cookie
              format where a line holding only `%` separates documents; `auto` means fortune
              when such a line occurs in the first MiB), .jsonl (field `text_field`), .parquet
              (string column `text_field`);
       image: .png/.jpg/.jpeg/.webp files, .parquet (binary column `image_field`, or a struct
              column with a binary `bytes` field, as Hugging Face datasets store images);
       audio: .wav/.flac files, .parquet (binary column `audio_field`, or such a struct);
       video: animated .gif/.webp files (Pillow), .mp4/.webm/.mkv/.mov/.avi (PyAV, the optional
              `video` extra), .parquet (binary column `video_field` of such bytes, or a struct).
  2. Plan. The ordered input is cut into work *units*, a pure function of the inputs and the
     options, never of --workers. A piece of input is a whole media or fortune file, a byte range
     of `unit_bytes` of a line-based file (.txt lines, .jsonl; a line belongs to the range that
     holds its first byte) or one Parquet row group; consecutive pieces join a unit until it
     holds `unit_bytes` of input. Items (documents, images, audio files) are numbered within
     their unit; sample keys are `UUUUUU-IIIIIIII` (unit, item): unique and free of dots.
     Listing and planning are one streamed pass; the units are spooled to a local temporary
     file (plan.py) that the later passes re-read.
  3. Resume. The fingerprint is the input list (URL, size, version) plus every option that
     shapes the output. If `_progress/plan.json` holds the same fingerprint and the output's
     tokenizer.json still has the sha256 recorded there, that tokenizer is reused (training it
     again would give the same bytes, but costs two passes), and resumed units must share one
     tokenizer. The run id hashes the fingerprint with the tokenizer's sha256.
  4. Dedup (optional). A parallel pass hashes every item (sha256 of the document's UTF-8, or of
     the file bytes, before any decode check: a copy of an undecodable file counts as a
     duplicate) into sorted runs of (hash, unit, item) records on disk; their k-way merge keeps
     the first occurrence of each hash in (unit, item) order and tells each unit which of its
     item numbers to drop (dedup.py).
  5. Tokenizer (text, without --tokenizer, unless resumed): WordPiece trained in the parent
     over the kept documents (BERT normalizer and pre-tokenizer; [PAD]=0 [UNK]=1 [CLS]=2
     [SEP]=3 [MASK]=4), in two passes: the first collects the word-continuing characters,
     whose ids then come first in sorted order, so training is deterministic
     (tokenizer.continuing_alphabet): the same inputs and options give a byte-identical
     tokenizer.json, shards and manifest digest, with any number of workers. A given
     tokenizer may number them otherwise (BERT's WordPiece vocabulary has [CLS]=101) but must
     have all five; the manifest records their ids.
  6. Output. manifest.json is removed (from here on the dataset is incomplete); unless resumed,
     plan.json is removed, the tokenizer files are written, then the new plan.json.
  7. Units. A unit whose record `_progress/unit-UUUUUU.json` carries this run id and whose shards
     all read back with the recorded size and sha256 is reused. The others run in a process pool
     (spawn context: s3fs is not fork-safe), each writing `shard-UUUUUU-KKKKKK.tar` through a
     hashing wrapper (bytes and sha256 for free), rolling over at `shard_bytes` of tar or
     `shard_samples` samples, and then its record. Text samples are `{input_ids.npy, txt}`
     ("[CLS] doc [SEP]", never truncated, encoded in small batches). Images and audio keep their
     original bytes under the extension of their detected format (jpg, png, webp; wav, flac)
     after a full decode check; an undecodable item is skipped and counted, or an error with
     `strict`. A video clip is decoded whole and stored as a frame sequence: one member per
     frame, `NNNN.png` (GIF/WebP sources, lossless) or `NNNN.jpg` (lossy codecs), and `json` =
     {"frames": n, "fps": f} (fps when the source says it). With `key_field`, JSONL/Parquet samples also get `json` = {"id": value}.
  8. Manifest. Shards are listed in (unit, shard) order, with `stats` (units, skipped,
     duplicates) and, for text, `special_tokens` ({"pad": id, "unk": id, "cls": id, "sep": id,
     "mask": id}, of the tokenizer used). Shard files of prepare's naming (this version's or
     the older `shard-NNNNNN.tar`) and unit records that this run does not list are deleted, then
     manifest.json is written last. `_progress/` stays, so a re-run only verifies.
Tar headers use a fixed mtime and owner, and each unit depends only on its own input and the
tokenizer, so the same inputs and tokenizer give byte-identical shards whatever the number of
workers. Memory stays bounded: inputs are streamed, the plan is spooled to disk; the parent holds
8 bytes per unit, the shard list, (with dedup) a run buffer of at most 40 MiB plus the numbers
of the dropped items.

At scale (parts.py): `--part i/N` writes the units u with u % N == i and a part record, no
manifest; `--merge` checks the N parts, drops duplicates across parts, and writes the manifest a
single run would (same digest). Text parts need a shared --tokenizer: `--tokenizer-only` trains
one on a seeded sample of `--sample-docs` documents, deterministically (the same inputs and
options give a byte-identical tokenizer.json).

Modules: this one orchestrates the steps and holds the CLI; sources (inputs, units, items),
plan (fingerprint and the spooled units), media (decode checks), tokenizer, dedup (hash runs),
shard_writer (tar shards), units (writing units), resume (plan.json, unit records, the
manifest), parts (--part and --merge), runner (the process pool) and manifest (the output's
index) do the work.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import random
import sys
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import Any

from darkmatter import storage
from darkmatter.data_pipeline.manifest import (
    DEFAULT_SPECIAL_IDS,
    MANIFEST,
    PLAN,
    PROGRESS,
    SPECIAL_NAMES,
    SPECIAL_TOKENS,
    TOKENIZER,
    Manifest,
    PrepareError,
    PrepareRun,
    ShardInfo,
)
from darkmatter.data_pipeline.prepare.dedup import find_duplicates
from darkmatter.data_pipeline.prepare.media import read_clip
from darkmatter.data_pipeline.prepare.parts import (
    EXIT_PARTS_MISSING,
    PartsMissing,
    merge_parts,
    parse_part,
    run_part,
    tokenizer_url,
)
from darkmatter.data_pipeline.prepare.plan import Plan
from darkmatter.data_pipeline.prepare.resume import (
    resumable_tokenizer,
    reuse_units,
    start_run,
    write_manifest,
)
from darkmatter.data_pipeline.prepare.runner import Runner, progress_bar
from darkmatter.data_pipeline.prepare.shard_writer import ShardWriter
from darkmatter.data_pipeline.prepare.sources import (
    AUDIO_SUFFIXES,
    IMAGE_SUFFIXES,
    MODALITIES,
    TEXT_SUFFIXES,
    VIDEO_SUFFIXES,
    Options,
    Unit,
    expand_inputs,
    file_suffix,
    unit_items,
)
from darkmatter.data_pipeline.prepare.tokenizer import (
    load_tokenizer,
    special_token_ids,
    tokenizer_configs,
    train_tokenizer,
)
from darkmatter.data_pipeline.prepare.units import SKIPPED_EXAMPLES, RunContext, write_units

# What other packages import from here (most of it defined in the modules above).
__all__ = [
    "DEFAULT_SHARD_BYTES",
    "DEFAULT_SPECIAL_IDS",
    "MANIFEST",
    "MODALITIES",
    "PLAN",
    "PROGRESS",
    "SPECIAL_NAMES",
    "SPECIAL_TOKENS",
    "TOKENIZER",
    "Manifest",
    "PrepareError",
    "PrepareRun",
    "ShardInfo",
    "ShardWriter",
    "cli",
    "parser",
    "prepare",
    "prepare_tokenizer",
    "read_clip",
    "special_token_ids",
    "train_tokenizer",
]

DEFAULT_SHARD_BYTES = 64 * 2**20
UNIT_SHARDS = 8  # default unit: the input bytes of about 8 shards, so few shards are partial
DEFAULT_SAMPLE_DOCS = 1_000_000  # documents --tokenizer-only trains on


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def prepare(
    inputs: list[str],
    output_url: str,
    *,
    modality: str,
    text_field: str = "text",
    text_format: str = "auto",
    tokenizer: str | None = None,
    vocab_size: int = 8000,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    lowercase: bool = True,
    shard_samples: int | None = None,
    image_field: str = "image",
    audio_field: str = "audio",
    video_field: str = "video",
    key_field: str | None = None,
    workers: int | None = None,
    unit_bytes: int | None = None,
    dedup: bool = False,
    strict: bool = False,
    progress: bool | None = None,
    part: tuple[int, int] | None = None,
    merge: bool = False,
) -> Manifest:
    """Write the shards, tokenizer (text) and manifest of a dataset to `output_url`.

    `workers` processes write units in parallel (default min(4, CPUs)); the output does not
    depend on it. `unit_bytes` is the input size of a work unit (default 8 shards' worth).
    `progress`: a bar on stderr (default: when stderr is a terminal). A re-run with the same
    inputs and options resumes: finished, verified units are kept. The returned manifest's
    `run` says how many units were reused and names some skipped inputs.

    `part` = (i, N): write only part i of N and its part record (the returned manifest, of the
    part's shards, is not saved); `merge`: assemble the N parts into the dataset (parts.py).
    """
    workers = _default_workers() if workers is None else workers
    unit_bytes = UNIT_SHARDS * shard_bytes if unit_bytes is None else unit_bytes
    _check_options(modality, text_format, shard_bytes, shard_samples, workers, unit_bytes)
    if part is not None and merge:
        raise PrepareError("--part and --merge exclude each other: merge once all parts are done")
    show = sys.stderr.isatty() if progress is None else progress
    text = modality == "text"
    media_field = {"image": image_field, "audio": audio_field, "video": video_field}
    opts = Options(
        modality, text_field, media_field.get(modality, ""), key_field,
        shard_bytes, shard_samples, unit_bytes, strict,
    )  # fmt: skip
    given = load_tokenizer(tokenizer) if tokenizer and text else None
    if text and given is None and (part is not None or merge):
        raise PrepareError(
            f"--{'part' if part else 'merge'} of text needs --tokenizer (the parts must share "
            "one): train one first with `darkmatter prepare --tokenizer-only`"
        )
    settings = {
        "options": {k: v for k, v in asdict(opts).items() if k != "strict"},  # same output
        "text_format": text_format,
        "dedup": dedup,
        "vocab_size": vocab_size,
        "lowercase": lowercase,
        "tokenizer": given.to_str() if given is not None else None,
    }
    where = ", ".join(inputs)
    storage.check_bucket(output_url)  # before a long tokenizer training, not after
    with _plan(inputs, opts, text_format, settings, where) as plan, Runner(workers, show) as runner:
        ctx = RunContext(output_url, opts, plan, runner, show, "", None, "")
        if part is not None or merge:
            return _parts(ctx, given, part, dedup, where, lowercase)
        return _single(ctx, given, dedup, where, vocab_size, lowercase)


def _plan(
    inputs: list[str], opts: Options, text_format: str, settings: dict[str, Any], where: str
) -> Plan:
    """The plan, after the checks that need the whole listing."""
    suffixes = {"text": TEXT_SUFFIXES, "image": IMAGE_SUFFIXES, "audio": AUDIO_SUFFIXES,
                "video": VIDEO_SUFFIXES}  # fmt: skip
    plan = Plan(expand_inputs(inputs, suffixes[opts.modality]), opts, text_format, settings)
    if opts.modality != "text" and not plan.files:
        plan.close()
        what = {"image": "images", "audio": "audio files", "video": "video clips"}[opts.modality]
        raise PrepareError(f"no {what} found in {where}")
    if plan.av_file is not None:
        try:
            import av  # noqa: F401
        except ImportError:
            plan.close()
            raise PrepareError(
                f"{plan.av_file}: decoding {file_suffix(plan.av_file)} files needs PyAV "
                "(pip install 'darkmatter[video]')"
            ) from None
    return plan


def _tokenizer_json(given: Any) -> bytes:
    # Whole documents, whatever the tokenizer file says: the trainer crops to seq_len.
    given.no_truncation()
    given.no_padding()
    return given.to_str(pretty=True).encode()  # type: ignore[no-any-return]


def _specials(tok_json: bytes, output_url: str) -> dict[str, int]:
    """Of the tokenizer the shards are encoded with, resumed or not."""
    from tokenizers import Tokenizer

    return special_token_ids(
        Tokenizer.from_str(tok_json.decode()), storage.join(output_url, TOKENIZER)
    )


def _identify(ctx: RunContext, tok_json: bytes | None, tok_url: str | None) -> None:
    """The run id (fingerprint and tokenizer) and where workers read the tokenizer."""
    tok_sha = hashlib.sha256(tok_json).hexdigest() if tok_json else ""
    ctx.run = hashlib.sha256(f"{ctx.plan.fingerprint}:{tok_sha}".encode()).hexdigest()
    ctx.tokenizer_sha, ctx.tokenizer_url = tok_sha, tok_url if tok_json else None


def _plan_doc(ctx: RunContext) -> dict[str, Any]:
    return {"fingerprint": ctx.plan.fingerprint, "tokenizer_sha256": ctx.tokenizer_sha or None,
            "run": ctx.run, "units": ctx.plan.units, "files": ctx.plan.files}  # fmt: skip


def _single(
    ctx: RunContext, given: Any, dedup: bool, where: str, vocab_size: int, lowercase: bool
) -> Manifest:
    """One process prepares every unit (the default)."""
    text, output_url, plan = ctx.opts.modality == "text", ctx.output_url, ctx.plan
    dropped: dict[int, frozenset[int]] = {}
    items: int | None = None
    if dedup:
        with tempfile.TemporaryDirectory(prefix="darkmatter-dedup-") as tmp:
            dropped, items = find_duplicates(plan, ctx.opts, ctx.runner, ctx.show, plan.units, tmp)
    if text and (items == 0 or (items is None and not _has_items(plan, ctx.opts))):
        raise PrepareError(f"no text documents found in {where}")

    tok_json = resumable_tokenizer(output_url, plan.fingerprint, text)
    resumed = tok_json is not None
    if text and tok_json is None:
        if given is None:
            given = _train(plan, ctx.opts, dropped, vocab_size, lowercase, ctx.show)
        tok_json = _tokenizer_json(given)
    _identify(ctx, tok_json if text else None, storage.join(output_url, TOKENIZER))
    specials = _specials(tok_json, output_url) if text and tok_json else None

    storage.makedirs(output_url)
    storage.delete(storage.join(output_url, MANIFEST))  # from here on the dataset is incomplete
    if not resumed:
        start_run(output_url, _plan_doc(ctx), tok_json if text else None)
    if text:
        _write_configs(output_url, lowercase)
    records = reuse_units(output_url, range(plan.units), ctx.run, ctx.runner, ctx.show)
    reused = len(records)
    records.update(write_units(ctx, lambda u: u not in records, dropped))
    ordered = [records[u] for u in range(plan.units)]
    manifest = write_manifest(output_url, ctx.opts.modality, ordered, where, specials)
    examples = [e for r in ordered for e in r.skipped_examples]
    manifest.run = PrepareRun(plan.units, reused, plan.units - reused, examples[:SKIPPED_EXAMPLES])
    return manifest


def _parts(
    ctx: RunContext,
    given: Any,
    part: tuple[int, int] | None,
    dedup: bool,
    where: str,
    lowercase: bool,
) -> Manifest:
    """--part i/N or --merge (parts.py)."""
    text = ctx.opts.modality == "text"
    tok_json = _tokenizer_json(given) if text else None
    if part is not None:
        _identify(ctx, tok_json, tokenizer_url(ctx.output_url, part))
        return run_part(ctx, part, dedup, ctx.opts.modality, tok_json)
    _identify(ctx, tok_json, storage.join(ctx.output_url, TOKENIZER))
    specials = _specials(tok_json, ctx.output_url) if tok_json else None
    manifest = merge_parts(ctx, dedup, ctx.opts.modality, where, specials, _plan_doc(ctx), tok_json)
    if text:
        _write_configs(ctx.output_url, lowercase)
    return manifest


def _write_configs(output_url: str, lowercase: bool) -> None:
    for name, data in tokenizer_configs(lowercase).items():
        storage.write_bytes(storage.join(output_url, name), data)


def _check_options(
    modality: str,
    text_format: str,
    shard_bytes: int,
    shard_samples: int | None,
    workers: int,
    unit_bytes: int,
) -> None:
    if modality not in MODALITIES:
        raise PrepareError(f"modality must be text, image, audio or video, got {modality!r}")
    if text_format not in ("auto", "lines", "fortune"):
        raise PrepareError(f"text_format must be auto, lines or fortune, got {text_format!r}")
    if shard_bytes <= 0:
        raise PrepareError(f"shard size must be positive, got {shard_bytes} bytes")
    if shard_samples is not None and shard_samples < 1:
        raise PrepareError(f"shard_samples must be at least 1, got {shard_samples}")
    if workers < 1:
        raise PrepareError(f"workers must be at least 1, got {workers}")
    if unit_bytes <= 0:
        raise PrepareError(f"unit size must be positive, got {unit_bytes} bytes")


def _has_items(units: Iterable[Unit], opts: Options) -> bool:
    return any(next(unit_items(unit, opts), None) is not None for unit in units)


def _train(
    units: Iterable[Unit],
    opts: Options,
    dropped: dict[int, frozenset[int]],
    vocab_size: int,
    lowercase: bool,
    show: bool,
) -> Any:
    """Training, in the parent, over the documents that will be written (two passes)."""

    def documents(desc: str) -> Iterator[str]:
        with progress_bar(show, desc, "doc") as bar:
            for unit in units:
                drop = dropped.get(unit.index, frozenset())
                for i, item in enumerate(unit_items(unit, opts)):
                    if i not in drop:
                        bar.update(1)
                        yield str(item.data)

    return train_tokenizer(documents, vocab_size, lowercase)


def prepare_tokenizer(
    inputs: list[str],
    output_url: str,
    *,
    text_field: str = "text",
    text_format: str = "auto",
    vocab_size: int = 8000,
    lowercase: bool = True,
    sample_docs: int = DEFAULT_SAMPLE_DOCS,
    seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    unit_bytes: int | None = None,
    progress: bool | None = None,
) -> int:
    """`--tokenizer-only`: train prepare's WordPiece tokenizer on a sample of the text and
    write tokenizer.json and its config files to `output_url`, nothing else; the number of
    documents it was trained on.

    The sample: the documents of the units (as prepare plans them) in a seeded random order,
    up to `sample_docs`; the same inputs and options give a byte-identical tokenizer.json.
    """
    unit_bytes = UNIT_SHARDS * shard_bytes if unit_bytes is None else unit_bytes
    _check_options("text", text_format, shard_bytes, None, 1, unit_bytes)
    if sample_docs < 1:
        raise PrepareError(f"sample_docs must be at least 1, got {sample_docs}")
    show = sys.stderr.isatty() if progress is None else progress
    opts = Options("text", text_field, "", None, shard_bytes, None, unit_bytes, False)
    where = ", ".join(inputs)
    storage.check_bucket(output_url)
    with _plan(inputs, opts, text_format, {}, where) as plan:
        order = array("Q", range(plan.units))
        random.Random(seed).shuffle(order)
        taken = [0]

        def documents(desc: str) -> Iterator[str]:
            taken[0] = 0
            with progress_bar(show, desc, "doc", sample_docs) as bar:
                for doc in itertools.islice(
                    (str(item.data) for u in order for item in unit_items(plan[u], opts)),
                    sample_docs,
                ):
                    taken[0] += 1
                    bar.update(1)
                    yield doc

        tok = train_tokenizer(documents, vocab_size, lowercase)
        if taken[0] == 0:
            raise PrepareError(f"no text documents found in {where}")
    storage.makedirs(output_url)
    storage.write_bytes(storage.join(output_url, TOKENIZER), _tokenizer_json(tok))
    _write_configs(output_url, lowercase)
    return taken[0]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def parser() -> argparse.ArgumentParser:
    """The arguments of `darkmatter prepare` (the SLURM and Kubernetes launchers are checked
    against it)."""
    # The module docstring's first paragraph (its first line alone stops mid-sentence).
    summary = " ".join(__doc__.split("\n\n")[0].split())
    p = argparse.ArgumentParser(
        prog="darkmatter prepare",
        description=f"{summary} Running the same command again resumes: work units already "
        "written are verified and kept, and only the rest is done.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders (recursed)")
    p.add_argument(
        "--output", required=True, metavar="URL", help="s3://bucket/prefix, file://… or a folder"
    )
    p.add_argument("--modality", choices=list(MODALITIES),
                   help="what the inputs hold; the files of other kinds in folders are skipped")  # fmt: skip
    p.add_argument(
        "--text-field", default="text", metavar="NAME", help="JSONL field / Parquet column"
    )
    p.add_argument(
        "--image-field", default="image", metavar="NAME", help="Parquet column of image bytes"
    )
    p.add_argument(
        "--audio-field", default="audio", metavar="NAME", help="Parquet column of audio bytes"
    )
    p.add_argument(
        "--video-field", default="video", metavar="NAME", help="Parquet column of video bytes"
    )
    p.add_argument(
        "--key-field",
        metavar="NAME",
        help="JSONL field / Parquet column kept as {'id': value} in a json member",
    )
    p.add_argument(
        "--text-format",
        default="auto",
        choices=["auto", "lines", "fortune"],
        help=".txt layout: a document per line, or fortune files split by '%%' lines",
    )
    p.add_argument(
        "--tokenizer", metavar="PATH", help="an existing tokenizer.json instead of training one"
    )
    p.add_argument("--vocab-size", type=int, default=8000, metavar="N",
                   help="size of the WordPiece vocabulary trained on the text (default %(default)s)")  # fmt: skip
    p.add_argument("--shard-size-mb", type=float, default=64.0, metavar="F",
                   help="a new shard starts past F MiB of tar (default %(default)s)")  # fmt: skip
    p.add_argument("--shard-samples", type=int, metavar="N", help="at most N samples per shard")
    p.add_argument(
        "--unit-size-mb",
        type=float,
        metavar="F",
        help="input per work unit, the grain of parallelism and resume (default 8 shards)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=_default_workers(),
        metavar="N",
        help="processes writing shards (default %(default)s); the output does not depend on it",
    )
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents/files")
    p.add_argument(
        "--strict", action="store_true", help="an undecodable image/audio/video file is an error"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--cased", action="store_true", help="do not lowercase (trained tokenizer only)")
    _scale_arguments(p)
    return p


def cli(argv: list[str]) -> int:
    """`darkmatter prepare INPUT [INPUT ...] --output URL --modality text|image|audio|video ...`"""
    p = parser()
    try:
        args = p.parse_args(argv)
        if args.modality is None and not args.tokenizer_only:
            p.error("the following arguments are required: --modality")
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return int(e.code or 0)
    try:
        return _run(args)
    except PartsMissing as e:  # not an error yet: a merge job retries until the parts are done
        print(f"darkmatter prepare: error: {e}", file=sys.stderr)
        return EXIT_PARTS_MISSING
    # OSError covers FileNotFoundError and object-store refusals (PermissionError).
    except (PrepareError, storage.StorageError, OSError) as e:
        print(f"darkmatter prepare: error: {e}", file=sys.stderr)
        return 2


def _scale_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--part", metavar="I/N",
                   help="write only part I of N (0-based) of the work units and its part record, "
                        "no manifest; text needs --tokenizer")  # fmt: skip
    p.add_argument("--merge", action="store_true",
                   help="once every --part I/N is done: check them and write the manifest "
                        "(same inputs and options as the parts)")  # fmt: skip
    p.add_argument("--tokenizer-only", action="store_true",
                   help="only train the tokenizer on a sample of the text and write "
                        "tokenizer.json (for --tokenizer of --part runs)")  # fmt: skip
    p.add_argument("--sample-docs", type=int, default=DEFAULT_SAMPLE_DOCS, metavar="N",
                   help="documents --tokenizer-only trains on (default %(default)s)")  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    unit_bytes = int(args.unit_size_mb * 2**20) if args.unit_size_mb is not None else None
    if args.tokenizer_only:
        if args.modality not in (None, "text"):
            raise PrepareError("--tokenizer-only trains a text tokenizer: --modality text")
        docs = prepare_tokenizer(
            args.inputs, args.output, text_field=args.text_field, text_format=args.text_format,
            vocab_size=args.vocab_size, lowercase=not args.cased, sample_docs=args.sample_docs,
            shard_bytes=int(args.shard_size_mb * 2**20), unit_bytes=unit_bytes,
            progress=False if args.quiet else None,
        )  # fmt: skip
        print(f"tokenizer: {storage.join(args.output, TOKENIZER)} (trained on {docs} documents)")
        return 0
    part = parse_part(args.part) if args.part is not None else None
    m = prepare(
        args.inputs, args.output, modality=args.modality, text_field=args.text_field,
        text_format=args.text_format, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        shard_bytes=int(args.shard_size_mb * 2**20), lowercase=not args.cased,
        shard_samples=args.shard_samples, image_field=args.image_field,
        audio_field=args.audio_field, video_field=args.video_field,
        key_field=args.key_field, workers=args.workers,
        unit_bytes=unit_bytes, dedup=args.dedup, strict=args.strict,
        progress=False if args.quiet else None, part=part, merge=args.merge,
    )  # fmt: skip
    _summary(m, args.output, part)
    return 0


def _summary(m: Manifest, output: str, part: tuple[int, int] | None) -> None:
    size = _human(sum(s.bytes for s in m.shards))
    done = f"part {part[0]}/{part[1]}: " if part else ""
    print(
        f"{done}prepared {m.num_samples} {m.modality} samples in {len(m.shards)} shards ({size}) "
        f"at {output}"
    )
    if m.tokenizer:
        print(f"tokenizer: {storage.join(output, m.tokenizer)}")
    stats, run = m.stats or {}, m.run
    if run is not None:
        print(
            f"{run.units} work units ({run.written} written, {run.reused} reused); "
            f"skipped {stats.get('skipped', 0)} undecodable inputs; "
            f"removed {stats.get('duplicates', 0)} duplicates"
        )
        for example in run.skipped_examples:
            print(f"darkmatter prepare: skipped {example}", file=sys.stderr)
    if part is not None:
        print(f"once all {part[1]} parts are done: the same command with --merge instead of --part")
