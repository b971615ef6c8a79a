"""Garbage collection over a command's life, when `darkmatter` runs as a program.

Importing torch, transformers and DeepSpeed creates millions of objects that live as long as
the process, and hardly any garbage. Python's default thresholds still run a collection every
700 allocations, and its full collections scan all of them: ~2 s of every process's start,
and ~3 s more at exit, when the interpreter collects once more (bench/startup.py). So:

    begin()    the program starts: collections stay on, but only every 100,000 allocations
    settle()   the heavy imports are done (a rank's trainer is built): what exists now is
               frozen (never scanned again) and the default thresholds come back
    end()      the command returned: freeze everything, so the exit collects nothing

Nothing changes for a caller of `darkmatter.cli.main(argv)` in its own process (tests): only
the program's entry point calls begin() and end(), and settle() does nothing without begin().
"""

from __future__ import annotations

import gc

_default: tuple[int, ...] | None = None  # the thresholds begin() replaced


def begin() -> None:
    global _default
    if _default is None:
        _default = gc.get_threshold()
        gc.set_threshold(100_000, *_default[1:])


def settle() -> None:
    global _default
    if _default is not None:
        gc.freeze()
        gc.set_threshold(*_default)
        _default = None


def end() -> None:
    gc.freeze()
