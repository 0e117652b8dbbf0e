"""The local audit spool, kept as a journal: framed records, a dead-letter file, one lock.

Format. Each record is one line ``<length> <crc32 as 8 hex digits> <JSON>\\n``. The length
(bytes of the JSON) and the checksum tell a whole record from a torn or damaged one, and
the line end lets a reader find the next record after damage. A line that starts with
``{`` is a record of the previous format (one JSON object a line, no frame) and is still
read, so an upgrade does not strand what an older version spooled.

Damage. A record that cannot be read (a last line cut short by a full disk or a crash, a
wrong length or checksum, JSON that does not parse, a record the caller cannot use, a
record the database refuses) is copied, with its reason, to ``dead-letter.jsonl`` in the
same folder, counted in ``nbo_audit_dead_letters_total`` and logged by file and offset,
never by contents; the records before and after it are read as usual. A failed append
is cut back off the file, so a full disk leaves no torn record; one left by a crash is
ended with a line break before the next append, so it cannot swallow the next record.

Locking. Each process appends to its own live file ``decisions-<pid>.jsonl``, holding an
exclusive ``flock`` on it. A replayer (in any process) claims a file by taking that same
lock and, for a live file, renaming it away (``decisions-<pid>.<token>.jsonl``) before
reading it. An appender that holds the lock but finds that the path no longer names the
file it opened opens the path again, so no record is ever appended to a file that has
been read; and as the claim renames the file, appenders never wait on a replayer's
database commit. The replayer keeps its lock on the claimed file until the records are
stored (then it deletes the file) or the database fails (then it leaves the file,
rewritten without what was already stored).

Files are created 0600 and the folder 0700, whatever the umask: records hold customer
data.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import errno
import fcntl
import functools
import json
import logging
import os
import re
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import orjson

from service.metrics import AUDIT_DEAD_LETTERS

log = logging.getLogger("nbo.audit")

Reason = Literal["torn_tail", "bad_frame", "bad_checksum", "bad_json", "bad_record", "rejected"]
"""Why a record went to the dead-letter file (the metric's ``reason`` label)."""

DEAD_LETTER_NAME: Final = "dead-letter.jsonl"
SPOOL_GLOB: Final = "decisions-*.jsonl"
FILE_MODE: Final = 0o600
FOLDER_MODE: Final = 0o700

_LIVE_NAME = re.compile(r"decisions-\d+\.jsonl")
_HEADER = re.compile(rb"(\d{1,10}) ([0-9a-f]{8}) ")
_RECORD_START = re.compile(re.escape(b'{"decision"'))
# A frame header just before a record start, found when records were glued together.
_HEADER_BEFORE = re.compile(rb"(\d{1,10}) [0-9a-f]{8} \Z")
_LOCK_WAIT_SECONDS = 10.0


def frame(payload: bytes) -> bytes:
    """One spool line holding ``payload`` (JSON text)."""
    return b"%d %08x %s\n" % (len(payload), zlib.crc32(payload), payload)


@dataclass(slots=True)
class Entry:
    """A readable record of a spool file: its offset, its JSON text and that JSON parsed."""

    offset: int
    payload: bytes
    value: Any


@dataclass(slots=True)
class Damage:
    """An unreadable stretch of a spool file."""

    offset: int
    reason: Reason
    raw: bytes


def parse(data: bytes) -> tuple[list[Entry], list[Damage]]:
    """The readable records of a spool file's bytes, and the damaged stretches between them.

    Never raises: every byte of ``data`` ends up in an entry, in a damage, or is blank.
    """
    entries: list[Entry] = []
    damage: list[Damage] = []
    offset = 0
    while offset < len(data):
        newline = data.find(b"\n", offset)
        end = len(data) if newline < 0 else newline
        line = data[offset:end]
        if line.strip():
            _parse_line(line, offset, newline >= 0, entries, damage)
        offset = end + 1
    return entries, damage


def _parse_line(
    line: bytes, offset: int, terminated: bool, entries: list[Entry], damage: list[Damage]
) -> None:
    decoded = _decode(line, offset)
    if isinstance(decoded, Entry):
        entries.append(decoded)
        return
    # Records glued to a damaged one (an older version appended after a torn write
    # without ending it): read each piece on its own.
    starts = _piece_starts(line)
    ends = [*starts[1:], len(line)]
    pieces = (
        [(0, line, decoded)]
        if len(starts) == 1
        else [
            (start, line[start:end], _decode(line[start:end], offset + start))
            for start, end in zip(starts, ends, strict=True)
        ]
    )
    for i, (start, piece, result) in enumerate(pieces):
        if isinstance(result, Entry):
            entries.append(result)
        elif piece.strip():
            torn = i == len(pieces) - 1 and not terminated
            damage.append(Damage(offset + start, "torn_tail" if torn else result, piece))


def _decode(chunk: bytes, offset: int) -> Entry | Reason:
    header = _HEADER.match(chunk)
    if header:
        payload = chunk[header.end() :]
        if len(payload) != int(header[1]):
            return "bad_frame"
        if zlib.crc32(payload) != int(header[2], 16):
            return "bad_checksum"
    elif chunk.startswith(b"{"):
        payload = chunk  # the previous format: a bare JSON line
    else:
        return "bad_frame"
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        try:  # the previous format was written by json.dumps, which allows NaN
            value = json.loads(payload)
        except (ValueError, RecursionError):
            return "bad_json"
    return Entry(offset, payload, value)


def _piece_starts(line: bytes) -> list[int]:
    """Where records may start in a damaged line: 0, and each record start after it (with
    its frame header, taking the shortest length that frames the rest of the piece)."""
    starts = [m.start() for m in _RECORD_START.finditer(line) if m.start() > 0]
    bounds: list[int] = []
    stop = len(line)
    for start in reversed(starts):
        header = _HEADER_BEFORE.search(line, max(0, start - 20), start)
        chosen = start
        if header:
            digits = header[1]
            for k in range(1, len(digits) + 1):  # garbage digits may precede the length
                if int(digits[-k:]) == stop - start:
                    chosen = header.end(1) - k
                    break
            else:
                chosen = header.start()
        bounds.append(chosen)
        stop = chosen
    return sorted({0, *bounds})


@dataclass(slots=True)
class Claim:
    """A spool file this process holds (locked) while it replays it."""

    path: Path
    fd: int
    entries: list[Entry] = field(default_factory=list)


class Journal:
    """The spool folder: this process's live file, the claims of replay, dead letters."""

    def __init__(self, folder: Path, live_name: str) -> None:
        self.folder = folder
        self.live = folder / live_name
        self.dead_letters = folder / DEAD_LETTER_NAME
        # flock excludes other processes and other open files of this one; this lock
        # keeps this process's own appenders (the writer and a closing writer) in turn.
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ appending

    def append(self, payloads: Sequence[bytes]) -> None:
        """Append one framed record per payload to the live file, durably (fsynced).

        Raises OSError when the records could not be made durable; the file is then
        left as it was (a partial write is cut off again).
        """
        data = b"".join(frame(p) for p in payloads)
        with self._lock:
            self._make_folder()
            fd = self._open_live_locked()
            try:
                created = _append(fd, data)
            finally:
                os.close(fd)  # releases the flock
            if created:
                fsync_folder(self.folder)  # the new file's name must survive a crash too

    def _make_folder(self) -> None:
        self.folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # made by an older version under the umask
            os.chmod(self.folder, FOLDER_MODE)

    def _open_live_locked(self) -> int:
        """The live file, open for appending and locked; the one its path names now."""
        deadline = time.monotonic() + _LOCK_WAIT_SECONDS
        while True:
            fd = _open_private(self.live, os.O_RDWR | os.O_APPEND | os.O_CREAT)
            try:
                if _try_lock(fd) and _names(self.live, fd):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # a replayer holds it or renamed it away: open the path again
            if time.monotonic() > deadline:
                raise OSError(errno.EWOULDBLOCK, "the spool file stayed locked")
            time.sleep(0.001)

    # ------------------------------------------------------------------ replaying

    def pending_files(self) -> list[Path]:
        """The spool files (of any process, past or present) that hold bytes."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.glob(SPOOL_GLOB):
            with contextlib.suppress(FileNotFoundError):  # replayed and deleted meanwhile
                if path.stat().st_size:
                    found.append(path)
        return sorted(found)

    def claims(self) -> Iterator[Claim]:
        """Each spool file that no one else holds, claimed and read; its damaged records
        are already in the dead-letter file. A claim holds until the caller asks for the
        next one (or closes the iterator); the caller ends it with :meth:`finish` or
        :meth:`keep`, or leaves it as it is."""
        for path in self.pending_files():
            claim = self._claim(path)
            if claim is None:
                continue
            try:
                yield claim
            finally:
                os.close(claim.fd)

    def _claim(self, path: Path) -> Claim | None:
        try:
            fd = _open_private(path, os.O_RDWR)
        except FileNotFoundError:
            return None  # replayed and deleted meanwhile
        try:
            if not (_try_lock(fd) and _names(path, fd)):
                os.close(fd)  # another replayer holds it, or has moved it
                return None
            if _LIVE_NAME.fullmatch(path.name):
                claimed = path.with_name(f"decisions-{os.getpid()}.{uuid.uuid4().hex[:12]}.jsonl")
                os.rename(path, claimed)  # from here on appends go to a new live file
                path = claimed
            claim = Claim(path, fd)
            entries, damage = parse(_read_all(fd))
            for bad in damage:
                self.dead_letter(path.name, bad.offset, bad.reason, bad.raw)
            claim.entries = entries
            if damage:  # so that they are not dead-lettered again
                self.keep(claim, entries, force=True)
            return claim
        except BaseException:
            os.close(fd)
            raise

    def finish(self, claim: Claim) -> None:
        """Every record of ``claim`` is stored or dead-lettered: delete its file."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(claim.path)

    def keep(self, claim: Claim, entries: Sequence[Entry], *, force: bool = False) -> None:
        """Only ``entries`` of ``claim`` still wait: rewrite its file with just them.

        The new file is written and locked under a temporary name, then renamed over
        the claimed one, so a crash leaves either file whole and no other replayer can
        take the new one before this claim ends.
        """
        if not force and len(entries) == len(claim.entries):
            return
        temporary = claim.path.with_name(f".{claim.path.name}.{uuid.uuid4().hex[:12]}.tmp")
        fd = _open_private(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: nobody else knows it yet
            _write_all(fd, b"".join(frame(e.payload) for e in entries))
            os.fsync(fd)
            os.rename(temporary, claim.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        fsync_folder(self.folder)
        os.close(claim.fd)
        claim.fd = fd
        claim.entries = list(entries)

    # ------------------------------------------------------------------ dead letters

    def dead_letter(self, file: str, offset: int, reason: Reason, raw: bytes) -> None:
        """Append an unusable record (its bytes and why) to the dead-letter file, durably.

        Raises OSError if it could not be written; the caller then keeps the record
        where it was.
        """
        item: dict[str, Any] = {
            "at": dt.datetime.now(dt.UTC).isoformat(),
            "file": file,
            "offset": offset,
            "reason": reason,
        }
        try:
            item["raw"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            item["raw_base64"] = base64.b64encode(raw).decode("ascii")
        line = orjson.dumps(item) + b"\n"
        self._make_folder()
        fd = _open_private(self.dead_letters, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # its writers hold it only to append
            created = _append(fd, line)
        finally:
            os.close(fd)
        if created:
            fsync_folder(self.folder)
        AUDIT_DEAD_LETTERS.labels(reason).inc()
        log.error(
            "audit spool record moved to the dead-letter file",
            extra={"file": file, "offset": offset, "reason": reason},
        )


class RecordCounts:
    """Counts, for the metrics, the records waiting in a spool folder and those in its
    dead-letter file, without reading the same bytes twice.

    A record is a line (a torn last line is not counted until it is ended). Spool and
    dead-letter files only grow until they are replaced (a claim's rewrite, a replay's
    delete), so for a file seen before only the bytes added since are read; a file with
    a new inode, or shorter than before, is read again whole. During an outage the
    spool grows by megabytes a minute and a scrape still reads only what is new. Safe
    from any thread; never takes the spool's locks.
    """

    _CHUNK: Final = 1 << 20

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._seen: dict[Path, tuple[int, int, int]] = {}  # path -> (inode, size, lines)
        self._lock = threading.Lock()

    def __call__(self) -> tuple[int, int]:
        """``(records waiting in spool files, records in the dead-letter file)``."""
        with self._lock:
            seen: dict[Path, tuple[int, int, int]] = {}
            waiting = 0
            dead = 0
            paths = sorted(self.folder.glob(SPOOL_GLOB)) if self.folder.is_dir() else []
            for path in [*paths, self.folder / DEAD_LETTER_NAME]:
                lines = self._lines(path, seen)
                if path.name == DEAD_LETTER_NAME:
                    dead = lines
                else:
                    waiting += lines
            self._seen = seen  # files gone are forgotten
            return waiting, dead

    def _lines(self, path: Path, seen: dict[Path, tuple[int, int, int]]) -> int:
        try:
            with path.open("rb") as file:
                info = os.fstat(file.fileno())
                inode, size, lines = self._seen.get(path, (-1, 0, 0))
                if inode != info.st_ino or info.st_size < size:
                    size, lines = 0, 0
                file.seek(size)
                while chunk := file.read(self._CHUNK):
                    lines += chunk.count(b"\n")
                    size += len(chunk)
        except FileNotFoundError:
            return 0  # replayed and deleted meanwhile, or no dead letters
        seen[path] = (info.st_ino, size, lines)
        return lines


@functools.cache
def record_counts(folder: Path) -> RecordCounts:
    """The one :class:`RecordCounts` of ``folder`` in this process (its memory of what
    it read is kept across callers)."""
    return RecordCounts(folder)


def _open_private(path: Path, flags: int) -> int:
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # exactly 0600, whatever the umask or an older version
    except BaseException:
        os.close(fd)
        raise
    return fd


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not renamed or deleted)."""
    mine = os.fstat(fd)
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _append(fd: int, data: bytes) -> bool:
    """Append ``data`` to a locked file and fsync it; whether the file was empty before.

    A crash can leave a record without its line end: end it first, so it cannot swallow
    the new one. A write that fails (a full disk) is cut off again.
    """
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        data = b"\n" + data
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
            os.fsync(fd)
        raise
    return size == 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def fsync_folder(folder: Path) -> None:
    """Make a folder's entries (files created, renamed or removed in it) survive a
    crash of the machine."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
