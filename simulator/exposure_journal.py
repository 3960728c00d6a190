"""The instrument server's exposure journal: exactly-once exposure across retries and restarts.

A retried request id must never expose the specimen twice, even when the reply
was lost because the server process died. The driver's own retry cache
(:meth:`agent.driver.MicroscopeDriver.acquire`) lives in memory and dies with the
process, so the server writes ahead, to disk, what it is about to do:

1. ``begin``: request id, scan, dose and field, flushed and fsync'd *before* the exposure;
2. the tile image (``tiles/<hash>.npy``, written to a temporary name, fsync'd, renamed);
3. ``done``: the tile's placement, dose, times and metadata, fsync'd *before* the reply.

On start-up the journal is read back. A request id with ``done`` is answered from
its tile file without exposing; one with ``begin`` but no ``done`` was cut short by
the restart: the specimen may have received dose, so it is recorded as
``interrupted``, its dose is counted in full (the conservative choice), and a
retry of that id is refused with ``exposure_interrupted`` rather than exposed
again. Requests refused before exposure (``failed``) leave their id free.

Killing the server at any instant therefore gives, for one request id: no
exposure (killed before ``begin``; the retry exposes once), or one exposure
answered from the journal (killed after ``done``), or one exposure reported as
interrupted (killed in between). Never two.

An exposure stopped by ``abort`` after its scan started is ``interrupted`` too, with the dose of
the lines it scanned (its id is spent); one stopped before it started is ``failed`` (id free).

Files (``DIR/``): ``instrument.json`` (which instrument the journal belongs to, written
atomically), ``journal.jsonl`` (one JSON record a line, append-only, each line written by one
``write`` call and rolled back if the write fails), ``tiles/`` (one ``.npy`` per finished
exposure, written to a temporary name and renamed). Tiles are kept by a byte budget: on disk
``tile_budget_bytes`` (8 GiB by default, a long session of 4096 x 4096 tiles), in memory
``memory_budget_bytes`` (512 MiB); the oldest go first, the newest is always kept. Every
exposed id is remembered for as long as the journal exists; a retry of one whose tile is gone
gets ``reply_expired``. Without a directory the same bookkeeping is kept in memory only, which
covers lost replies but not restarts.

Damage on disk: a last line torn by a kill (or a full disk) is moved aside to
``journal.torn.jsonl`` and the journal truncated to its last complete line, so the next record
never lands on a fragment and a restart is never refused; a record glued onto such a fragment by
an older version is recovered from the line. Any other damage (a bad line in the middle) is
refused, since exposures could then not be accounted for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.driver import ScanRequest, Tile
from agent.errors import (
    ConfigError,
    ExposureInterruptedError,
    JournalWriteError,
    ReplyExpiredError,
    ScanRequestError,
)
from agent.protocol.messages import jsonable

JOURNAL_FILE = "journal.jsonl"
INSTRUMENT_FILE = "instrument.json"
TILES_DIR = "tiles"
TORN_FILE = "journal.torn.jsonl"
"""Where torn or damaged tail fragments of the journal are kept (appended, one per line, as JSON strings)."""

DEFAULT_TILE_BUDGET_BYTES = 8 << 30
"""Tiles kept on disk: 8 GiB, 128 tiles of 4096 x 4096 or 8,192 of 512 x 512."""
DEFAULT_MEMORY_BUDGET_BYTES = 512 << 20
"""Tiles kept in memory for fast replays: 512 MiB (all of them, without a journal folder)."""

Status = Literal["exposing", "done", "interrupted"]


@dataclass
class _Record:
    scan: ScanRequest
    status: Status
    dose_e_per_a2: float  # counted in the totals: for a partial (aborted) exposure, averaged over the field
    extent_nm: tuple[float, float, float, float]  # area dosed (the scanned band of an aborted exposure)
    area_dose_e_per_a2: float  # dose per area on extent_nm
    tile: dict[str, Any] | None = None  # TileInfo fields, once done


def tile_file_name(request_id: str) -> str:
    """File name of a tile: a hash of the request id, so a client-chosen id never names a path."""
    return hashlib.sha256(request_id.encode("utf-8")).hexdigest()[:40] + ".npy"


def _fsync_directory(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        handle = os.open(path, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def write_atomically(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a part.

    Parameters
    ----------
    path : pathlib.Path
        The file to (re)place.
    data : bytes
        Its new content.
    durable : bool
        fsync the file and its directory, so a power cut keeps it too.

    Raises
    ------
    OSError
        If the temporary file cannot be written (it is removed again).
    """
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    if durable:
        _fsync_directory(path.parent)


class ExposureJournal:
    """Write-ahead record of every exposure, by request id (see the module notes).

    Parameters
    ----------
    directory : str or pathlib.Path or None
        Where the journal lives (created); None keeps it in memory only.
    fingerprint : dict
        What identifies the instrument (description, driver, configuration); a journal written
        for another instrument is refused.
    tile_budget_bytes : int
        Bytes of tile files kept on disk (with a directory); the oldest tiles are deleted beyond
        it, the newest is always kept.
    memory_budget_bytes : int
        Bytes of tiles kept in memory for answering retries without reading the disk; without a
        directory this is the whole retention.
    durable : bool
        fsync every record and tile, so that not even a power cut loses one; a killed process
        loses nothing either way.
    logger : logging.Logger, optional
        Where repairs and write failures are reported.

    Raises
    ------
    ConfigError
        If the directory holds the journal of another instrument, cannot be written, or has a
        damaged record before its last line.
    """

    def __init__(
        self,
        directory: str | Path | None,
        fingerprint: dict[str, Any],
        *,
        tile_budget_bytes: int = DEFAULT_TILE_BUDGET_BYTES,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        durable: bool = True,
        logger: logging.Logger | None = None,
    ) -> None:
        for name, value in (
            ("tile_budget_bytes", tile_budget_bytes),
            ("memory_budget_bytes", memory_budget_bytes),
        ):
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a whole number of bytes >= 0, got {value!r}")
        self.directory = Path(directory) if directory is not None else None
        self.tile_budget_bytes = tile_budget_bytes
        self.memory_budget_bytes = memory_budget_bytes
        self.durable = durable
        self._log = logger or logging.getLogger("micrography.journal")
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self._tiles: OrderedDict[str, Tile] = OrderedDict()  # recent tiles, in memory
        self._memory_bytes = 0
        self._on_disk: OrderedDict[str, int] = OrderedDict()  # ids whose tile file exists -> its bytes
        self._disk_bytes = 0
        self._fd: int | None = None
        self._size = 0  # bytes of complete records in the journal file
        # Running totals, so that status and events cost nothing however long the journal grows.
        self._exposures = 0
        self._interrupted = 0
        self._total_dose = 0.0
        self.restored: list[tuple[tuple[float, float, float, float], float]] = []
        """(area, dose per area) of every exposure read back at start-up, for restoring dose maps."""
        if self.directory is not None:
            self._open(fingerprint)

    # ------------------------------------------------------------------ start-up

    def _open(self, fingerprint: dict[str, Any]) -> None:
        assert self.directory is not None
        try:
            (self.directory / TILES_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(
                f"{self.directory}: cannot create the journal folder ({error.strerror})"
            ) from None
        identity = self.directory / INSTRUMENT_FILE
        wanted = jsonable(fingerprint)
        recorded = None
        if identity.exists():
            try:
                recorded = json.loads(identity.read_text(encoding="utf-8"))
            except ValueError:
                # Written atomically since this version; an older server may have been killed while
                # writing it. The journal itself still tells which exposures were made.
                self._log.warning("%s is unreadable; writing it again for this instrument", identity)
        if recorded is not None and recorded != wanted:
            raise ConfigError(
                f"{self.directory} is the exposure journal of another instrument or configuration "
                f"({recorded.get('instrument', {}).get('name', '?')}, see {identity}); give this "
                "server its own --journal folder (or delete the old one if that specimen is gone)"
            )
        if recorded is None:
            try:
                write_atomically(identity, (json.dumps(wanted, indent=2) + "\n").encode(), self.durable)
            except OSError as error:
                raise ConfigError(
                    f"{identity}: cannot write it ({error.strerror}); free space or fix permissions"
                ) from None
        path = self.directory / JOURNAL_FILE
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as error:
            raise ConfigError(f"{path}: cannot open the journal ({error.strerror})") from None
        self._replay(path)
        for name in os.listdir(self.directory / TILES_DIR):
            if name.endswith(".tmp"):  # a tile write cut short: never referenced by a done record
                with contextlib.suppress(OSError):
                    (self.directory / TILES_DIR / name).unlink()
        for request_id, record in self._records.items():
            if record.status == "exposing":
                record.status = "interrupted"
                self._append_logged({"event": "interrupted", "request_id": request_id, "t_s": time.time()})
                self._log.warning(
                    "request %s was being exposed when the server stopped; recorded as interrupted "
                    "(dose %.6g e-/A^2 counted); a retry of it will be refused",
                    request_id,
                    record.dose_e_per_a2,
                )
            if record.status in ("done", "interrupted"):
                self.restored.append((record.extent_nm, record.area_dose_e_per_a2))
                self._count(record)
        self._evict()

    def _replay(self, path: Path) -> None:
        """Read the journal back, repairing a torn tail (see the module notes)."""
        data = path.read_bytes()
        *complete, fragment = data.split(b"\n")
        # Everything after the last newline is a torn fragment (empty when the file ends cleanly).
        good_size = len(data) - len(fragment)
        for number, line in enumerate(complete, start=1):
            if line.strip() and not self._parse_line(line, number, path, last=number == len(complete)):
                # A newline-terminated last record that does not parse: as torn as a fragment.
                fragment = line + b"\n" + fragment
                good_size -= len(line) + 1
        assert self._fd is not None
        if fragment and not fragment.endswith(b"\n"):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                # A whole record whose newline is missing: it counts (the safe side for a begin).
                self._apply(json.loads(fragment))
                os.write(self._fd, b"\n")
                self._size = good_size + len(fragment) + 1
                return
        if fragment:
            self._set_aside(path, fragment, good_size)
        self._size = good_size

    def _parse_line(self, line: bytes, number: int, path: Path, *, last: bool) -> bool:
        """Apply one journal line; False for an unreadable last line, ConfigError for any other."""
        try:
            self._apply(json.loads(line))
            return True
        except (ValueError, KeyError, TypeError) as error:
            # A record glued onto the fragment of a torn line by an older version: recover it.
            start = line.rfind(b'{"event"')
            if start > 0:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    self._apply(json.loads(line[start:]))
                    self._log.warning(
                        "%s: line %d began with a torn fragment of %d bytes; recovered the record after it",
                        path,
                        number,
                        start,
                    )
                    return True
            if last:
                return False
            raise ConfigError(
                f"{path}: line {number} is not a valid journal record ({error}); the journal is "
                "damaged before its last line, so exposures cannot be accounted for: restore it from a "
                "backup, or move the folder away knowing that its exposed request ids are forgotten"
            ) from None

    def _apply(self, entry: dict[str, Any]) -> None:
        event = entry["event"]
        request_id = entry["request_id"]
        if event == "begin":
            extent = tuple(float(value) for value in entry["extent_nm"])
            dose = float(entry["dose_e_per_a2"])
            self._records[request_id] = _Record(
                scan=ScanRequest.model_validate(entry["scan"]),
                status="exposing",
                dose_e_per_a2=dose,
                extent_nm=extent,  # type: ignore[arg-type]
                area_dose_e_per_a2=dose,
            )
        elif event == "done":
            record = self._records[request_id]
            record.status, record.tile = "done", entry["tile"]
            record.dose_e_per_a2 = record.area_dose_e_per_a2 = float(entry["tile"]["dose_e_per_a2"])
            assert self.directory is not None
            tile_path = self.directory / TILES_DIR / tile_file_name(request_id)
            if entry.get("tile_file", True) and tile_path.exists():
                self._on_disk[request_id] = tile_path.stat().st_size
                self._on_disk.move_to_end(request_id)
                self._disk_bytes += self._on_disk[request_id]
        elif event == "interrupted":
            record = self._records[request_id]
            record.status = "interrupted"
            if "dose_e_per_a2" in entry:  # an abort that knew how far the scan got
                record.dose_e_per_a2 = float(entry["dose_e_per_a2"])
                record.extent_nm = tuple(float(value) for value in entry["extent_nm"])  # type: ignore[assignment]
        elif event == "failed":
            self._records.pop(request_id, None)
        elif event == "tile_deleted":
            size = self._on_disk.pop(request_id, None)
            self._disk_bytes -= size or 0
        else:
            raise ValueError(f"unknown event {event!r}")

    def _set_aside(self, path: Path, fragment: bytes, good_size: int) -> None:
        """Keep a torn tail in TORN_FILE, then cut the journal back to its last complete line."""
        aside = path.with_name(TORN_FILE)
        entry = json.dumps(
            {"t_s": time.time(), "offset": good_size, "fragment": fragment.decode("utf-8", "replace")}
        )
        try:
            with open(aside, "a", encoding="utf-8") as handle:
                handle.write(entry + "\n")
                handle.flush()
                if self.durable:
                    os.fsync(handle.fileno())
        except OSError as error:
            # The fragment never was a record: losing the copy loses nothing that was promised.
            self._log.warning("could not keep the torn fragment in %s (%s)", aside, error.strerror)
        assert self._fd is not None
        os.ftruncate(self._fd, good_size)
        if self.durable:
            os.fsync(self._fd)
        self._log.warning(
            "%s: the last line was incomplete (%d bytes, the server was killed or the disk was full while "
            "writing it); moved it to %s and cut the journal back to its last complete record",
            path,
            len(fragment),
            aside,
        )

    # ------------------------------------------------------------------ bookkeeping

    def _append(self, entry: dict[str, Any]) -> None:
        """Append one record in one write; on failure cut the file back, so no fragment is left.

        Raises
        ------
        JournalWriteError
            If the record could not be written (disk full, file-size limit, I/O error).
        """
        if self._fd is None:
            return
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode("utf-8")
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(28, f"only {written} of {len(line)} bytes written")
            if self.durable:
                os.fsync(self._fd)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)  # shrinking a file needs no space
            raise JournalWriteError(
                f"the exposure journal {self.directory} cannot be written ({error.strerror or error}); "
                "free disk space (or raise the file-size limit) on the instrument server"
            ) from None
        self._size += len(line)

    def _append_logged(self, entry: dict[str, Any]) -> bool:
        """:meth:`_append` for records whose loss errs on the safe side; a failure is logged."""
        try:
            self._append(entry)
        except JournalWriteError as error:
            self._log.error("%s (record %s of %s not written)", error, entry["event"], entry["request_id"])
            return False
        return True

    def _count(self, record: _Record) -> None:
        """Add a record that just became an exposure (done or interrupted) to the totals."""
        self._exposures += 1
        self._interrupted += record.status == "interrupted"
        self._total_dose += record.dose_e_per_a2

    def _evict(self) -> None:
        """Drop the oldest tiles beyond the budgets (the newest is always kept); ids stay known."""
        while len(self._tiles) > 1 and self._memory_bytes > self.memory_budget_bytes:
            _, old = self._tiles.popitem(last=False)
            self._memory_bytes -= old.image.nbytes
        while len(self._on_disk) > 1 and self._disk_bytes > self.tile_budget_bytes:
            old_id, size = self._on_disk.popitem(last=False)
            self._disk_bytes -= size
            assert self.directory is not None
            with contextlib.suppress(OSError):
                (self.directory / TILES_DIR / tile_file_name(old_id)).unlink()
            self._append_logged({"event": "tile_deleted", "request_id": old_id, "t_s": time.time()})

    def lookup(self, scan: ScanRequest) -> Tile | None:
        """The tile already made for ``scan.request_id``, or None if the id was never exposed.

        Parameters
        ----------
        scan : ScanRequest
            The (retried) request.

        Returns
        -------
        Tile or None
            The recorded tile (bit-identical to the first reply); None means "expose it".

        Raises
        ------
        ScanRequestError
            If the id was used for a different scan.
        ExposureInterruptedError
            If a restart or an abort cut the exposure of this id short.
        ReplyExpiredError
            If the id was exposed but its tile is no longer kept (or its file is unreadable).
        """
        with self._lock:
            record = self._records.get(scan.request_id)
            if record is None:
                return None
            if record.scan != scan:
                raise ScanRequestError(
                    f"request id {scan.request_id} was already used for a different scan; "
                    "give every new scan a new id"
                )
            if record.status == "exposing":
                return None  # in progress in this process: the server's in-flight table answers
            if record.status == "interrupted":
                raise ExposureInterruptedError(
                    f"request {scan.request_id} was cut short after it started (the instrument server "
                    "restarted or the scan was aborted); the area may have received its dose "
                    f"({record.dose_e_per_a2:.6g} e-/A^2, counted), so it is not exposed again under this "
                    "id; send a new request if the "
                    "area must be scanned again"
                )
            tile = self._tiles.get(scan.request_id)
            if tile is not None:
                self._tiles.move_to_end(scan.request_id)
                return tile
            if scan.request_id in self._on_disk:
                try:
                    return self._load_tile(scan, record)
                except (OSError, ValueError) as error:
                    self._log.error("tile of %s unreadable: %s", scan.request_id, error)
            raise ReplyExpiredError(
                f"request {scan.request_id} was exposed earlier, but its tile is no longer kept (the "
                f"server keeps {self.tile_budget_bytes / 2**30:.3g} GiB of tiles on disk and "
                f"{self.memory_budget_bytes / 2**20:.4g} MiB in memory); it is not exposed again under this "
                "id; send a new request to scan the area again"
            )

    def _load_tile(self, scan: ScanRequest, record: _Record) -> Tile:
        assert self.directory is not None and record.tile is not None
        image = np.load(self.directory / TILES_DIR / tile_file_name(scan.request_id), allow_pickle=False)
        info = record.tile
        return Tile(
            image=image,
            request=scan,
            origin_nm=tuple(info["origin_nm"]),  # type: ignore[arg-type]
            pixel_size_nm=float(info["pixel_size_nm"]),
            dose_e_per_a2=float(info["dose_e_per_a2"]),
            t_start=float(info["t_start"]),
            t_end=float(info["t_end"]),
            metadata=dict(info["metadata"]),
        )

    def begin(self, scan: ScanRequest, dose_e_per_a2: float) -> None:
        """Record, durably, that ``scan`` is about to be exposed (call after validation).

        Raises
        ------
        JournalWriteError
            If the record cannot be written: then nothing is recorded and nothing may be exposed.
        """
        with self._lock:
            self._append(
                {
                    "event": "begin",
                    "request_id": scan.request_id,
                    "scan": scan.model_dump(mode="json"),
                    "dose_e_per_a2": dose_e_per_a2,
                    "extent_nm": list(scan.extent_nm),
                    "t_s": time.time(),
                }
            )
            self._records[scan.request_id] = _Record(
                scan=scan,
                status="exposing",
                dose_e_per_a2=dose_e_per_a2,
                extent_nm=scan.extent_nm,
                area_dose_e_per_a2=dose_e_per_a2,
            )

    def done(self, tile: Tile) -> None:
        """Record the finished tile before it is sent (image file first, then the record).

        Never raises for a full disk: the exposure has happened and its tile is in hand, so it is
        kept in memory and answered; a tile file that cannot be written is logged (after a
        restart a retry gets ``reply_expired``), and a ``done`` record that cannot be written
        leaves the ``begin``, so after a restart the id is reported interrupted, never exposed again.
        """
        request_id = tile.request.request_id
        info = {
            "request_id": request_id,
            "origin_nm": list(tile.origin_nm),
            "pixel_size_nm": tile.pixel_size_nm,
            "dose_e_per_a2": tile.dose_e_per_a2,
            "t_start": tile.t_start,
            "t_end": tile.t_end,
            "metadata": jsonable(tile.metadata),
        }
        tile_bytes = None
        if self.directory is not None:
            try:
                tile_bytes = self._write_tile(request_id, tile.image)
            except OSError as error:
                self._log.error(
                    "cannot write the tile of %s (%s); it is answered from memory only",
                    request_id,
                    error.strerror,
                )
        with self._lock:
            record = self._records[request_id]
            record.status, record.tile = "done", info
            record.dose_e_per_a2 = record.area_dose_e_per_a2 = tile.dose_e_per_a2
            self._count(record)
            self._append_logged(
                {
                    "event": "done",
                    "request_id": request_id,
                    "tile": info,
                    "tile_file": tile_bytes is not None,
                    "t_s": time.time(),
                }
            )
            self._tiles[request_id] = tile
            self._memory_bytes += tile.image.nbytes
            if tile_bytes is not None:
                self._on_disk[request_id] = tile_bytes
                self._disk_bytes += tile_bytes
            self._evict()

    def _write_tile(self, request_id: str, image: np.ndarray) -> int:
        """Write one tile file atomically; returns its size in bytes."""
        assert self.directory is not None
        final = self.directory / TILES_DIR / tile_file_name(request_id)
        temporary = final.with_suffix(".tmp")
        try:
            with open(temporary, "wb") as handle:
                np.save(handle, image, allow_pickle=False)
                handle.flush()
                if self.durable:
                    os.fsync(handle.fileno())
                size = handle.tell()
            os.replace(temporary, final)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        if self.durable:
            _fsync_directory(final.parent)
        return size

    def failed(self, scan: ScanRequest, reason: str) -> None:
        """Record that ``scan`` was refused or aborted before exposing; its id may be used again."""
        with self._lock:
            # Unwritten, the begin stays: after a restart the id is spent, the safe side.
            self._append_logged(
                {"event": "failed", "request_id": scan.request_id, "reason": reason, "t_s": time.time()}
            )
            self._records.pop(scan.request_id, None)

    def interrupted(
        self,
        scan: ScanRequest,
        reason: str,
        *,
        dose_e_per_a2: float | None = None,
        extent_nm: tuple[float, float, float, float] | None = None,
    ) -> None:
        """Record that the exposure of ``scan`` stopped midway: dose counted, id spent.

        Parameters
        ----------
        scan : ScanRequest
            The exposure.
        reason : str
            Why, for the journal.
        dose_e_per_a2 : float, optional
            Dose delivered, averaged over the field (an abort knows how many lines it scanned);
            by default the whole scan's dose, the conservative choice when nobody knows.
        extent_nm : tuple of float, optional
            The area that received the per-area dose (the scanned band); by default the field.
        """
        with self._lock:
            record = self._records.get(scan.request_id)
            entry: dict[str, Any] = {"event": "interrupted", "request_id": scan.request_id, "reason": reason}
            if dose_e_per_a2 is not None:
                entry["dose_e_per_a2"] = dose_e_per_a2
                entry["extent_nm"] = list(extent_nm or scan.extent_nm)
            entry["t_s"] = time.time()
            if record is not None and record.status == "exposing":
                record.status = "interrupted"
                if dose_e_per_a2 is not None:
                    record.dose_e_per_a2 = dose_e_per_a2
                    record.extent_nm = extent_nm or scan.extent_nm
                self._count(record)
            # Unwritten, the begin stays: after a restart the id is interrupted all the same.
            self._append_logged(entry)

    # ------------------------------------------------------------------ accounting

    @property
    def exposures(self) -> int:
        """Exposures recorded (done or interrupted), over every restart when on disk."""
        return self._exposures

    @property
    def interrupted_exposures(self) -> int:
        """Exposures cut short by a restart, a driver failure or an abort (counted in :attr:`exposures`)."""
        return self._interrupted

    @property
    def total_dose_e_per_a2(self) -> float:
        """Sum of the doses of the recorded exposures, e-/Å².

        A scan cut short by a restart or a driver failure counts in full (nobody knows how far it
        got); one stopped by an abort counts its dose averaged over its field (the per-area dose
        times the fraction of lines scanned).
        """
        return self._total_dose

    @property
    def known_ids(self) -> int:
        """Request ids exposed (done or interrupted) or being exposed; never forgotten."""
        return len(self._records)

    @property
    def kept_bytes(self) -> tuple[int, int]:
        """Bytes of tiles kept ``(on disk, in memory)``."""
        return self._disk_bytes, self._memory_bytes

    def close(self) -> None:
        """Close the journal file (records are already on disk)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
