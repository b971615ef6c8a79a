"""The plan of a `darkmatter prepare` run, made in one streamed pass over the input listing: the
run fingerprint (every input's URL, size and version, and the options that shape the output)
and the work units, spooled to a local temporary file so that the passes that follow (dedup,
tokenizer training, writing) re-read them in order or by number without holding them in memory.

Memory: 8 bytes per unit (its offset in the spool) and one folder's listing at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

from darkmatter.data_pipeline.prepare.sources import (
    AV_SUFFIXES,
    InputFile,
    Options,
    Unit,
    file_suffix,
    plan_units,
)

_FORMAT = 2  # bump when the same inputs and options would give other shards


class Plan:
    """Units of the inputs in order, re-readable; `fingerprint`, `files`, `units` counts and the
    first file needing PyAV (`av_file`) are known once made."""

    def __init__(self, files: Iterable[InputFile], opts: Options, text_format: str,
                 settings: dict[str, Any]):  # fmt: skip
        self.files = 0
        self.av_file: str | None = None
        self._sha = hashlib.sha256(
            json.dumps({"format": _FORMAT, **settings}, sort_keys=True).encode()
        )
        self._offsets = array("Q")
        fd, self._path = tempfile.mkstemp(prefix="darkmatter-plan-")
        try:
            with os.fdopen(fd, "wb") as spool:
                for unit in plan_units(self._count(files), opts, text_format):
                    self._offsets.append(spool.tell())
                    pickle.dump(unit, spool, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException:  # bad input: the error stands, the spool goes
            self.close()
            raise
        self.fingerprint = self._sha.hexdigest()

    def _count(self, files: Iterable[InputFile]) -> Iterator[InputFile]:
        for f in files:
            self.files += 1
            self._sha.update(json.dumps([f.url, f.size, f.version]).encode() + b"\n")
            if self.av_file is None and file_suffix(f.url) in AV_SUFFIXES:
                self.av_file = f.url
            yield f

    @property
    def units(self) -> int:
        return len(self._offsets)

    def __iter__(self) -> Iterator[Unit]:
        with open(self._path, "rb") as spool:
            for _ in range(len(self._offsets)):
                yield pickle.load(spool)

    def __getitem__(self, u: int) -> Unit:
        with open(self._path, "rb") as spool:
            spool.seek(self._offsets[u])
            unit: Unit = pickle.load(spool)
            return unit

    def close(self) -> None:
        if os.path.exists(self._path):
            os.unlink(self._path)

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
