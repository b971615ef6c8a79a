"""The error every storage failure that a user must act on is raised as."""

from __future__ import annotations


class StorageError(RuntimeError):
    """Object storage is missing or unreachable; the message names the URL or bucket."""
