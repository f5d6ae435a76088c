"""Files of the Batch API: upload (batch input, every line checked as it streams by),
read back in parts, list, delete; and the writer that batches use for their output.

A file's bytes are stored in parts of about `PART_BYTES`, written before its record, so
no file is ever held whole in memory and a half-written file is never visible.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import ClassVar

import orjson

from openbeepboop.server.core import json_input
from openbeepboop.server.errors import InvalidRequest, NotFound, PayloadTooLarge
from openbeepboop.server.models import BATCH_ENDPOINTS, ENDPOINTS, JSON, ApiKey, Role, StoredFile
from openbeepboop.server.store.base import Store

PART_BYTES = 1 << 20
BATCH_PURPOSE = "batch"
OUTPUT_PURPOSE = "batch_output"
UPLOAD_PURPOSES = (BATCH_PURPOSE, "user_data", "fine-tune", "assistants", "vision", "evals")

# Checks one line's body for its endpoint: None when valid, else what is wrong.
BodyCheck = Callable[[str, JSON], "str | None"]


def new_file_id() -> str:
    """A file id: `file-` and 96 random bits."""
    return "file-" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One request of a batch input file."""

    number: int  # 1-based line number in the file
    custom_id: str
    url: str
    body: JSON


def parse_batch_line(raw: bytes, number: int, check_body: BodyCheck | None = None) -> BatchLine:
    """One line of a batch input file; InvalidRequest naming the line when it is wrong."""

    def bad(message: str) -> InvalidRequest:
        return InvalidRequest(f"line {number}: {message}", param="file", code="invalid_line")

    try:
        value = json_input.loads(raw)
    except ValueError as exc:
        raise bad(f"not valid JSON ({exc})") from exc
    except InvalidRequest as exc:
        raise bad(exc.message) from None
    if not isinstance(value, dict):
        raise bad("expected a JSON object with custom_id, method, url and body")
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise bad("'custom_id' must be a non-empty string")
    if len(custom_id) > 512:
        raise bad("'custom_id' is longer than 512 characters")
    if value.get("method", "POST") != "POST":
        raise bad("'method' must be POST")
    url = value.get("url")
    if url not in BATCH_ENDPOINTS:
        raise bad(f"'url' must be one of {', '.join(BATCH_ENDPOINTS)}, not {url!r}")
    body = value.get("body")
    if not isinstance(body, dict):
        raise bad("'body' must be a JSON object")
    problem = _body_problem(url, body, check_body)
    if problem is not None:
        raise bad(problem)
    return BatchLine(number, custom_id, url, body)


def _body_problem(url: str, body: JSON, check_body: BodyCheck | None) -> str | None:
    if body.get("stream"):
        return "'stream' is not allowed in a batch"
    if "template" in body:  # an assistant template, rendered when the batch runs
        if url != ENDPOINTS[0]:
            return f"a 'template' body needs url {ENDPOINTS[0]}"
        if not isinstance(body["template"], str) or not isinstance(body.get("query", ""), str):
            return "'template' and 'query' must be strings"
        return None
    return None if check_body is None else check_body(url, body)


async def lines_of(
    parts: AsyncIterable[bytes], max_line_bytes: int | None = None
) -> AsyncIterator[tuple[int, bytes]]:
    """(line number, bytes) of each non-blank line of a stream of byte chunks. A line
    longer than `max_line_bytes` is refused as soon as that many bytes of it have
    arrived: no more than one chunk and the limit are ever held."""
    number = 0
    rest = bytearray()  # the unfinished line: appended to, never re-split
    async for chunk in parts:
        *complete, tail = chunk.split(b"\n")
        if not complete:
            rest += tail
            _check_length(len(rest), number + 1, max_line_bytes)
            continue
        complete[0] = bytes(rest) + complete[0]
        rest = bytearray(tail)
        for raw in complete:
            number += 1
            _check_length(len(raw), number, max_line_bytes)
            if raw.strip():
                yield number, raw
        _check_length(len(rest), number + 1, max_line_bytes)
    if rest.strip():
        yield number + 1, bytes(rest)


def _check_length(size: int, number: int, max_line_bytes: int | None) -> None:
    if max_line_bytes is not None and size > max_line_bytes:
        raise InvalidRequest(
            f"line {number}: longer than the limit of {max_line_bytes} bytes",
            param="file",
            code="line_too_long",
        )


@dataclass(frozen=True, slots=True)
class ExpiresAfter:
    """OpenAI's `expires_after` of an upload: the file goes `seconds` after `anchor`."""

    seconds: int
    anchor: str = "created_at"

    MIN: ClassVar[int] = 3600  # OpenAI's bounds: an hour to 30 days
    MAX: ClassVar[int] = 30 * 86_400

    @classmethod
    def parse(cls, anchor: object, seconds: object) -> ExpiresAfter:
        """From the form's `expires_after[anchor]` and `expires_after[seconds]`."""
        if anchor != "created_at":
            raise InvalidRequest(
                f"expires_after.anchor must be 'created_at', not {anchor!r}",
                param="expires_after.anchor",
            )
        try:
            value = int(str(seconds))
        except ValueError:
            value = 0
        if not cls.MIN <= value <= cls.MAX:
            raise InvalidRequest(
                f"expires_after.seconds must be a whole number from {cls.MIN} to {cls.MAX}, "
                f"not {seconds!r}",
                param="expires_after.seconds",
            )
        return cls(value, anchor)


class PartWriter:
    """Writes a file's bytes to the store in parts, then its record."""

    def __init__(self, store: Store, file_id: str) -> None:
        self.store = store
        self.file_id = file_id
        self.size = 0
        self.lines = 0
        self._parts = 0
        self._buffer = bytearray()

    async def write(self, data: bytes) -> None:
        self._buffer += data
        self.size += len(data)
        if len(self._buffer) >= PART_BYTES:
            await self._flush()

    async def write_line(self, value: JSON) -> None:
        self.lines += 1
        await self.write(orjson.dumps(value) + b"\n")

    async def _flush(self) -> None:
        if self._buffer:
            await self.store.put_file_part(self.file_id, self._parts, bytes(self._buffer))
            self._parts += 1
            self._buffer.clear()

    async def finish(
        self,
        owner: str,
        purpose: str,
        filename: str,
        now: float,
        expires_at: float | None = None,
    ) -> StoredFile:
        await self._flush()
        record = StoredFile(
            self.file_id, owner, purpose, filename, self.size, now, self.lines, 0, expires_at
        )
        return await self.store.create_file(record)


class Files:
    """The files a key may see, over a `Store`.

    Bounds on what a key may upload: `max_bytes` per file, `max_lines` and
    `max_line_bytes` per batch file, `quota_bytes` for every file a key has (0: none).
    An upload without `expires_after` whose purpose is not `batch` expires after
    `default_expiry_seconds` (0: never); a batch file goes with its batches."""

    def __init__(
        self,
        store: Store,
        max_bytes: int,
        max_lines: int,
        clock: Callable[[], float] = time.time,
        *,
        max_line_bytes: int | None = None,
        quota_bytes: int = 0,
        default_expiry_seconds: float = 0.0,
    ) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.max_lines = max_lines
        self.max_line_bytes = max_line_bytes
        self.quota_bytes = quota_bytes
        self.default_expiry_seconds = default_expiry_seconds
        self._clock = clock

    async def upload(
        self,
        key: ApiKey,
        filename: str,
        purpose: str,
        chunks: AsyncIterable[bytes],
        check_body: BodyCheck | None = None,
        expires_after: ExpiresAfter | None = None,
    ) -> StoredFile:
        """Store an uploaded file. A `batch` file must be JSONL of batch lines with unique
        custom_ids, at most `max_lines`; the first wrong line is named in the error and
        nothing is kept."""
        if purpose not in UPLOAD_PURPOSES:
            raise InvalidRequest(
                f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}, not {purpose!r}",
                param="purpose",
            )
        limit = await self._room(key)
        writer = PartWriter(self.store, new_file_id())
        try:
            if purpose == BATCH_PURPOSE:
                await self._copy_batch_lines(writer, chunks, check_body, limit)
            else:
                async for chunk in chunks:
                    await self._write_bounded(writer, chunk, limit)
            if writer.size == 0:
                raise InvalidRequest("the file is empty", param="file")
            now = self._clock()
            expires_at = self._expires_at(purpose, now, expires_after)
            return await writer.finish(key.id, purpose, filename, now, expires_at)
        except BaseException:
            await self.store.delete_file(writer.file_id)
            raise

    async def _room(self, key: ApiKey) -> tuple[int, str]:
        """How many bytes this upload may have, and the limit's name for the error."""
        if not self.quota_bytes:
            return self.max_bytes, "size"
        room = self.quota_bytes - await self.store.owner_file_bytes(key.id)
        if room < self.max_bytes:
            return max(room, 0), "quota"
        return self.max_bytes, "size"

    def _expires_at(self, purpose: str, now: float, given: ExpiresAfter | None) -> float | None:
        if given is not None:
            return now + given.seconds
        if purpose != BATCH_PURPOSE and self.default_expiry_seconds > 0:
            return now + self.default_expiry_seconds
        return None

    async def _copy_batch_lines(
        self,
        writer: PartWriter,
        chunks: AsyncIterable[bytes],
        check_body: BodyCheck | None,
        limit: tuple[int, str],
    ) -> None:
        seen: set[str] = set()

        async def counted() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                await self._write_bounded(writer, chunk, limit)
                yield chunk

        async for number, raw in lines_of(counted(), self.max_line_bytes):
            line = parse_batch_line(raw, number, check_body)
            if line.custom_id in seen:
                raise InvalidRequest(
                    f"line {number}: custom_id {line.custom_id!r} appears on an earlier line; "
                    "each line needs its own",
                    param="file",
                    code="duplicate_custom_id",
                )
            seen.add(line.custom_id)
            writer.lines += 1
            if writer.lines > self.max_lines:
                raise InvalidRequest(
                    f"a batch file holds at most {self.max_lines} requests",
                    param="file",
                    code="too_many_lines",
                )

    async def _write_bounded(
        self, writer: PartWriter, chunk: bytes, limit: tuple[int, str]
    ) -> None:
        most, which = limit
        if writer.size + len(chunk) > most:
            if which == "quota":
                raise PayloadTooLarge(
                    f"this key's files would be larger than its quota of {self.quota_bytes} "
                    "bytes; delete some files first",
                    param="file",
                    code="file_quota_exceeded",
                )
            raise PayloadTooLarge(
                f"the file is larger than the limit of {self.max_bytes} bytes", param="file"
            )
        await writer.write(chunk)

    async def get(self, key: ApiKey, file_id: str) -> StoredFile:
        found = await self.store.get_file(file_id)
        if found is None or (key.role is not Role.ADMIN and found.owner != key.id):
            raise NotFound(f"no file with id {file_id!r}", param="file_id", code="file_not_found")
        return found

    async def list_files(
        self, key: ApiKey, purpose: str | None, limit: int, after: str | None
    ) -> list[StoredFile]:
        owner = None if key.role is Role.ADMIN else key.id
        before = None if after is None else (await self.get(key, after)).seq
        return await self.store.list_files(owner, purpose, limit, before)

    async def content(self, file: StoredFile) -> AsyncIterator[bytes]:
        """The file's bytes, one stored part at a time."""
        index = 0
        while (part := await self.store.read_file_part(file.id, index)) is not None:
            yield part
            index += 1

    async def delete(self, key: ApiKey, file_id: str) -> StoredFile:
        found = await self.get(key, file_id)
        await self.store.delete_file(found.id)
        return found
