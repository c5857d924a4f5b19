"""Finds the records of a LLaVA JSON file without loading it: one streaming pass that yields every
top-level record with its byte range, in bounded memory, for a JSON list or for JSON lines.

A 665k-record LLaVA file is one JSON list of about 1 GB; `json.load` would hold all of it (several GB
as Python objects) on the driver. `iter_json_records` instead decodes the stream chunk by chunk and
parses one record at a time with `json.JSONDecoder.raw_decode` (C speed), keeping only the current
record in memory. A record that does not parse is delimited by a bracket-depth scan that steps over
strings, and is still yielded, so it can be rejected with its reason. The byte ranges let many read
tasks later fetch disjoint slices of the same file in parallel (ranged reads on S3).
"""

from __future__ import annotations

import codecs
import json
import re
from typing import BinaryIO, Iterator, NamedTuple

# A string (escapes included), possibly cut by the end of the buffer, or one structural character.
# Numbers, literals, ':' and whitespace are stepped over by the regex engine.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?P<closed>")?|[\[\]{},]')
_WHITESPACE = " \t\r\n"
_DECODER = json.JSONDecoder()


class JsonLayoutError(ValueError):
    """The file is neither a JSON list nor JSON lines, or its brackets never balance."""


class JsonRecord(NamedTuple):
    """One top-level element: bytes [start, end) of the file, those bytes, and the parsed object when
    the element is a JSON object (None when it is malformed, not an object, or not UTF-8)."""

    start: int
    end: int
    raw: bytes
    value: dict | None


def iter_json_records(stream: BinaryIO, *, chunk_bytes: int = 1 << 22, name: str = "input") -> Iterator[JsonRecord]:
    """Yields every top-level record of a JSON list or JSON-lines `stream`, in file order."""
    head = stream.read(chunk_bytes)
    first = head.removeprefix(codecs.BOM_UTF8).lstrip(b" \t\r\n")[:1]
    if first == b"[":
        yield from _iter_list(stream, head, chunk_bytes, name)
    elif first == b"{":
        yield from _iter_lines(stream, head, chunk_bytes)
    elif first:
        raise JsonLayoutError(f"{name}: starts with {first!r}; expected a JSON list ('[') or JSON lines ('{{')")


def parse_record(raw: bytes) -> dict | None:
    """The JSON object in `raw`, or None if `raw` is not valid UTF-8 JSON holding an object."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, 4300+-digit numbers, deep nesting
        return None
    return value if isinstance(value, dict) else None


def _iter_lines(stream: BinaryIO, buffer: bytes, chunk_bytes: int) -> Iterator[JsonRecord]:
    offset = 0  # absolute position of buffer[0]
    while True:
        chunk = stream.read(chunk_bytes)
        buffer += chunk
        lines = buffer.split(b"\n")
        if chunk:
            buffer = lines.pop()  # possibly a cut line: wait for the rest
        for line in lines:
            stripped = line.strip(b" \t\r\n")
            if stripped:
                start = offset + len(line) - len(line.lstrip(b" \t\r\n"))
                yield JsonRecord(start, start + len(stripped), stripped, parse_record(stripped))
            offset += len(line) + 1
        if not chunk:
            return


def _iter_list(stream: BinaryIO, head: bytes, chunk_bytes: int, name: str) -> Iterator[JsonRecord]:
    # Invalid UTF-8 bytes become lone surrogates and encode back to the same bytes, so byte offsets
    # stay exact and a non-UTF-8 record reaches the rejects file instead of stopping the scan.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    text = decoder.decode(head)
    position = text.index("[") + 1
    offset = len(text[:position].encode("utf-8", "surrogateescape"))  # file byte of text[position]
    at_end = False
    while True:
        cursor = _skip_whitespace(text, position)
        record = None
        if cursor < len(text) and text[cursor] == "]":
            return
        if cursor < len(text):
            end, value = _decode_object(text, cursor)
            separator = _skip_whitespace(text, end) if end is not None else None
            if separator is not None and separator < len(text) and text[separator] in ",]":
                record = (cursor, end, value)
            elif separator is None or separator < len(text):
                # Not a well-formed element: delimit it by the next comma or ']' at its own depth.
                separator = _find_separator(text, cursor, at_end)
                if separator is not None:
                    end = len(text[:separator].rstrip(_WHITESPACE))
                    record = (cursor, end, None)
        if record is None:  # the element runs past the decoded text
            if at_end:
                raise JsonLayoutError(
                    f"{name}: the JSON list is not closed (an unterminated string or unbalanced brackets "
                    f"after byte {offset}); fix the file or convert it to JSON lines"
                )
            chunk = stream.read(chunk_bytes)
            at_end = not chunk
            text = text[position:] + decoder.decode(chunk, final=at_end)
            position = 0
            continue
        begin, end, value = record
        offset += len(text[position:begin].encode("utf-8", "surrogateescape"))
        raw = text[begin:end].encode("utf-8", "surrogateescape")
        if value is not None and not raw.isascii() and not _is_utf8(raw):
            value = None  # invalid UTF-8 bytes were carried as surrogates: not a valid record
        yield JsonRecord(offset, offset + len(raw), raw, value)
        offset += len(raw)
        position = _skip_whitespace(text, end)
        if text[position] == ",":
            position += 1
            offset += len(text[end:position].encode("utf-8", "surrogateescape"))
        else:
            return


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in _WHITESPACE:
        position += 1
    return position


def _decode_object(text: str, position: int) -> tuple[int | None, dict | None]:
    try:
        value, end = _DECODER.raw_decode(text, position)
    except (ValueError, RecursionError):
        # Not JSON, or JSON Python will not decode (a number of over 4300 digits, nesting deeper
        # than the recursion limit): the caller delimits the element by scanning instead.
        return None, None
    return end, value if isinstance(value, dict) else None


def _find_separator(text: str, position: int, at_end: bool) -> int | None:
    """Index of the first ',' or ']' at the depth of `position`, or None if `text` ends first."""
    depth = 0
    for match in _TOKEN.finditer(text, position):
        token = match.group()
        if token[0] == '"':
            if match.group("closed") is None and not at_end:
                return None
        elif token in "{[":
            depth += 1
        elif token in "}]":
            if depth == 0:
                return match.start() if token == "]" else None
            depth -= 1
        elif depth == 0:
            return match.start()
    return None
