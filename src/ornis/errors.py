"""Typed errors. Each names the thing it is about, what was expected and what was found."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path


class OrnisError(Exception):
    """Base class of every error ornis raises on purpose."""


class UnknownModelError(OrnisError, KeyError):
    """A model, architecture or weights name that no registry knows."""

    def __init__(self, name: str, known: Iterable[str], what: str = "model") -> None:
        self.name = name
        self.suggestions = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(s) for s in self.suggestions)}?" if self.suggestions else ""
        super().__init__(
            f"unknown {what} {name!r}{hint} (ornis.list_models() and ornis.list_pretrained_models() list them)"
        )

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class CheckpointError(OrnisError):
    """Something is wrong with a checkpoint file; `path` names it."""

    def __init__(self, path: str | Path | None, message: str) -> None:
        self.path = None if path is None else Path(path)
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{message}")


class CheckpointFormatError(CheckpointError):
    """The file is not a checkpoint in the published format (truncated, foreign, or unsafe to unpickle)."""


class StateDictMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the architecture: missing, unexpected or mis-shaped keys."""

    def __init__(
        self,
        path: str | Path | None,
        architecture: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.architecture = architecture
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        parts = [f"the weights do not fit architecture {architecture!r}"]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_short_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_short_list(unexpected)}")
        if mismatched:
            shapes = [f"{k} expected {tuple(e)} found {tuple(f)}" for k, e, f in mismatched]
            parts.append(f"{len(mismatched)} shape mismatch(es): {_short_list(shapes)}")
        super().__init__(path, "; ".join(parts))


class WeightsNotFoundError(OrnisError, FileNotFoundError):
    """Published weights are not in the cache and cannot be fetched (offline, unreachable)."""


class ChecksumError(OrnisError):
    """Downloaded or cached bytes do not match the manifest's sha256."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most ``limit`` characters (its type name when it has none): what
    an error message quotes of a lower-level failure."""
    text = str(e).strip().splitlines()
    return text[0][:limit] if text else type(e).__name__


def _short_list(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... (+{len(items) - limit} more)"


class EmbeddingsFormatError(OrnisError):
    """An embeddings table (Parquet) or index file lacks a column, or its contents do not fit the request."""


class ExportError(OrnisError):
    """A model cannot be exported as asked (format, output, dynamic size, destination); no file is left behind."""


class ExportCheckError(ExportError):
    """An exported model's outputs differ from the eager model's beyond the tolerance; the file was deleted."""
