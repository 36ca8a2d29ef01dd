"""Read a folder of text files as documents, streaming large files in pieces.

Supported: ``.txt`` and ``.md`` (one document per file) and ``.jsonl`` (one document per line, text in a
``text``, ``content`` or ``page_content`` field, every other field kept as metadata). Hidden files and
folders are skipped; binary and non-UTF-8 files are skipped with a :class:`CorpusWarning`.
"""
from __future__ import annotations

import codecs
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import CorpusError

SUPPORTED_SUFFIXES = (".txt", ".md", ".jsonl")
TEXT_FIELDS = ("text", "content", "page_content")
# Characters per piece when streaming a text file; pieces end at a paragraph or line break when possible.
PIECE_CHARS = 1 << 20
_READ_BYTES = 1 << 20


class CorpusWarning(UserWarning):
    """A corpus file or record was skipped."""


class Document(NamedTuple):
    """One document of a corpus.

    ``source`` is the file's path relative to the corpus folder (``file.jsonl#LINE`` for a JSONL record);
    ``pieces`` yields ``(char_offset, text)`` in order, concatenating to the whole document.
    """

    source: str
    pieces: Iterator[tuple[int, str]]
    metadata: dict[str, Any]


def iter_corpus(folder: str | os.PathLike[str]) -> Iterator[Document]:
    """Yield every document under ``folder``, recursively, in sorted path order.

    Checks the folder now; raises :class:`CorpusError` at the end of iteration if no file was usable.
    """
    root = Path(folder)
    if not root.exists():
        raise CorpusError(f"corpus folder {root} does not exist; pass a folder of .txt, .md or .jsonl files")
    if not root.is_dir():
        raise CorpusError(f"corpus path {root} is not a folder; put the file in a folder and pass the folder")
    return _iter_documents(root)


def _iter_documents(root: Path) -> Iterator[Document]:
    """Walk the folder, check each supported file, and yield its documents; count what was skipped."""
    yielded = 0
    skipped: list[str] = []
    unsupported: list[str] = []
    for path in _walk(root):
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            unsupported.append(rel)
            continue
        reason = _unusable_reason(path)
        if reason is not None:
            if reason != "empty":
                warnings.warn(f"skipping {path}: {reason}", CorpusWarning, stacklevel=2)
            skipped.append(f"{rel} ({reason})")
            continue
        documents = _jsonl_documents(path, rel) if path.suffix.lower() == ".jsonl" else [_text_document(path, rel)]
        for document in documents:
            yielded += 1
            yield document
    if unsupported:
        warnings.warn(
            f"skipped {len(unsupported)} file(s) in {root} with unsupported suffixes ({_listing(unsupported)}); "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}",
            CorpusWarning,
            stacklevel=2,
        )
    if not yielded:
        found = [f"{rel} (unsupported suffix)" for rel in unsupported] + skipped
        detail = f"; skipped: {_listing(found)}" if found else "; the folder has no (non-hidden) files"
        raise CorpusError(
            f"no usable document in {root}: expected UTF-8 text in {', '.join(SUPPORTED_SUFFIXES)} files{detail}"
        )


def _walk(root: Path) -> Iterator[Path]:
    """Files under ``root`` in sorted order, skipping hidden files and folders."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath, name)


def _listing(items: list[str], limit: int = 5) -> str:
    """The first few items, comma-separated, with a count of the rest."""
    shown = ", ".join(items[:limit])
    return shown + (f", and {len(items) - limit} more" if len(items) > limit else "")


def _unusable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be read as UTF-8 text ("empty" when it holds only whitespace), else None.

    Reads the file once in binary blocks with an incremental decoder, so memory stays bounded.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    has_text = False
    position = 0
    try:
        with open(path, "rb") as handle:
            while block := handle.read(_READ_BYTES):
                if b"\x00" in block:
                    return "binary file (contains NUL bytes)"
                try:
                    text = decoder.decode(block)
                except UnicodeDecodeError as exc:
                    return f"not UTF-8 text (invalid byte at offset {position + exc.start}); convert it to UTF-8"
                has_text = has_text or bool(text.strip())
                position += len(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "not UTF-8 text (truncated character at the end); convert it to UTF-8"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return None if has_text else "empty"


def _text_document(path: Path, rel: str) -> Document:
    """A .txt/.md file as one document, read lazily in pieces."""
    return Document(rel, _read_pieces(path), {})


def _read_pieces(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(offset, text)`` pieces of about PIECE_CHARS characters, cut after a paragraph or line break.

    Newlines are kept as they are in the file (no translation), so offsets index the file's text exactly.
    """
    offset = 0
    carry = ""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            while block := handle.read(PIECE_CHARS):
                text = carry + block
                cut = _piece_cut(text)
                yield offset, text[:cut]
                offset += cut
                carry = text[cut:]
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{path} could not be read as UTF-8 text while streaming it: {exc}") from exc
    if carry:
        yield offset, carry


def _piece_cut(text: str) -> int:
    """Where to end a piece: after the last paragraph break, else the last line break, else the last space."""
    for mark in ("\n\n", "\n", " "):
        at = text.rfind(mark)
        if at > 0:
            return at + len(mark)
    return len(text)


def _jsonl_documents(path: Path, rel: str) -> Iterator[Document]:
    """One document per JSONL line; bad lines are skipped with a warning naming file and line."""
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    warnings.warn(f"skipping {where}: not valid JSON ({exc.msg})", CorpusWarning, stacklevel=2)
                    continue
                field = next((f for f in TEXT_FIELDS if isinstance(record, dict) and f in record), None)
                if field is None or not isinstance(record[field], str):
                    warnings.warn(
                        f"skipping {where}: expected a JSON object with a string field "
                        f"{' / '.join(repr(f) for f in TEXT_FIELDS)}",
                        CorpusWarning,
                        stacklevel=2,
                    )
                    continue
                text = record.pop(field)
                if text.strip():
                    yield Document(f"{rel}#{number}", iter([(0, text)]), _record_metadata(record))
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{path} could not be read as UTF-8 text while streaming it: {exc}") from exc


def _record_metadata(record: dict[str, Any]) -> dict[str, Any]:
    """A record's other fields as metadata; a nested ``metadata`` object (LangChain style) is merged in."""
    nested = record.get("metadata")
    if isinstance(nested, dict):
        rest = {k: v for k, v in record.items() if k != "metadata"}
        return {**rest, **nested}
    return record
