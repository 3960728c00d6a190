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

Files (``DIR/``): ``instrument.json`` (which instrument the journal belongs to),
``journal.jsonl`` (one JSON record a line, append-only), ``tiles/`` (the most
recent ``keep_tiles`` tiles; older tiles are deleted, their ids stay known and a
retry of one gets ``reply_expired``). Without a directory the same bookkeeping
is kept in memory only, which covers lost replies but not restarts.
"""

from __future__ import annotations

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
from agent.errors import ConfigError, ExposureInterruptedError, RemoteInstrumentError, ScanRequestError
from agent.protocol.messages import jsonable

JOURNAL_FILE = "journal.jsonl"
INSTRUMENT_FILE = "instrument.json"
TILES_DIR = "tiles"

Status = Literal["exposing", "done", "interrupted"]


@dataclass
class _Record:
    scan: ScanRequest
    status: Status
    dose_e_per_a2: float
    extent_nm: tuple[float, float, float, float]
    tile: dict[str, Any] | None = None  # TileInfo fields, once done


def tile_file_name(request_id: str) -> str:
    """File name of a tile: a hash of the request id, so a client-chosen id never names a path."""
    return hashlib.sha256(request_id.encode("utf-8")).hexdigest()[:40] + ".npy"


class ExposureJournal:
    """Write-ahead record of every exposure, by request id (see the module notes).

    Parameters
    ----------
    directory : str or pathlib.Path or None
        Where the journal lives (created); None keeps it in memory only.
    fingerprint : dict
        What identifies the instrument (description, driver, configuration); a journal written
        for another instrument is refused.
    keep_tiles : int
        How many of the most recent tiles are kept for answering retries (in memory, and on
        disk when there is a directory).
    durable : bool
        fsync every record and tile, so that not even a power cut loses one; a killed process
        loses nothing either way.

    Raises
    ------
    ConfigError
        If the directory holds the journal of another instrument, or cannot be written.
    """

    def __init__(
        self,
        directory: str | Path | None,
        fingerprint: dict[str, Any],
        *,
        keep_tiles: int = 8,
        durable: bool = True,
        logger: logging.Logger | None = None,
    ) -> None:
        if keep_tiles < 1:
            raise ConfigError(f"keep_tiles must be at least 1 (the latest tile), got {keep_tiles}")
        self.directory = Path(directory) if directory is not None else None
        self.keep_tiles = keep_tiles
        self.durable = durable
        self._log = logger or logging.getLogger("micrography.journal")
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self._tiles: OrderedDict[str, Tile] = OrderedDict()  # recent tiles, in memory
        self._on_disk: OrderedDict[str, None] = OrderedDict()  # ids whose tile file exists
        self._handle: Any = None
        # Running totals, so that status and events cost nothing however long the journal grows.
        self._exposures = 0
        self._interrupted = 0
        self._total_dose = 0.0
        self.restored: list[tuple[tuple[float, float, float, float], float]] = []
        """(field, dose) of every exposure read back at start-up, for restoring dose maps."""
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
        if identity.exists():
            recorded = json.loads(identity.read_text(encoding="utf-8"))
            if recorded != wanted:
                raise ConfigError(
                    f"{self.directory} is the exposure journal of another instrument or configuration "
                    f"({recorded.get('instrument', {}).get('name', '?')}, see {identity}); give this "
                    "server its own --journal folder (or delete the old one if that specimen is gone)"
                )
        else:
            identity.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
        path = self.directory / JOURNAL_FILE
        if path.exists():
            self._replay(path)
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for appends
        for request_id, record in self._records.items():
            if record.status == "exposing":
                record.status = "interrupted"
                self._append({"event": "interrupted", "request_id": request_id, "t_s": time.time()})
                self._log.warning(
                    "request %s was being exposed when the server stopped; recorded as interrupted "
                    "(dose %.6g e-/A^2 counted); a retry of it will be refused",
                    request_id,
                    record.dose_e_per_a2,
                )
            if record.status in ("done", "interrupted"):
                self.restored.append((record.extent_nm, record.dose_e_per_a2))
                self._count(record)

    def _replay(self, path: Path) -> None:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
                event = entry["event"]
                request_id = entry["request_id"]
                if event == "begin":
                    self._records[request_id] = _Record(
                        scan=ScanRequest.model_validate(entry["scan"]),
                        status="exposing",
                        dose_e_per_a2=float(entry["dose_e_per_a2"]),
                        extent_nm=tuple(entry["extent_nm"]),  # type: ignore[arg-type]
                    )
                elif event == "done":
                    record = self._records[request_id]
                    record.status, record.tile = "done", entry["tile"]
                    if (self.directory / TILES_DIR / tile_file_name(request_id)).exists():  # type: ignore[operator]
                        self._on_disk[request_id] = None
                        self._on_disk.move_to_end(request_id)
                elif event == "interrupted":
                    self._records[request_id].status = "interrupted"
                elif event == "failed":
                    self._records.pop(request_id, None)
            except (ValueError, KeyError, TypeError) as error:
                if number == len(lines):
                    # The process was killed while writing this line: the record never counted.
                    self._log.warning("%s: ignoring the incomplete last line %d", path, number)
                    break
                raise ConfigError(
                    f"{path}: line {number} is not a valid journal record ({error}); the journal is "
                    "damaged, so exposures cannot be accounted for: repair or move it away"
                ) from None

    # ------------------------------------------------------------------ bookkeeping

    def _append(self, entry: dict[str, Any]) -> None:
        if self._handle is None:
            return
        self._handle.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._handle.flush()
        if self.durable:
            os.fsync(self._handle.fileno())

    def _count(self, record: _Record) -> None:
        """Add a record that just became an exposure (done or interrupted) to the totals."""
        self._exposures += 1
        self._interrupted += record.status == "interrupted"
        self._total_dose += record.dose_e_per_a2

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
            If a restart cut the exposure of this id short.
        RemoteInstrumentError
            If the id was exposed but its tile is no longer kept.
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
                    f"request {scan.request_id} was being exposed when the instrument server restarted; "
                    f"the area may have received its dose ({record.dose_e_per_a2:.6g} e-/A^2, counted), "
                    "so it is not exposed again under this id; send a new request if the area must be "
                    "scanned again"
                )
            tile = self._tiles.get(scan.request_id)
            if tile is not None:
                return tile
            if scan.request_id in self._on_disk:
                return self._load_tile(scan, record)
            raise RemoteInstrumentError(
                f"request {scan.request_id} was exposed earlier, but its tile is no longer kept (the "
                f"server keeps the latest {self.keep_tiles}); it is not exposed again under this id; "
                "send a new request to scan the area again"
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
        """Record, durably, that ``scan`` is about to be exposed (call after validation)."""
        with self._lock:
            self._records[scan.request_id] = _Record(
                scan=scan, status="exposing", dose_e_per_a2=dose_e_per_a2, extent_nm=scan.extent_nm
            )
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

    def done(self, tile: Tile) -> None:
        """Record the finished tile, durably, before it is sent (image file first, then the record)."""
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
        if self.directory is not None:
            self._write_tile(request_id, tile.image)
        with self._lock:
            record = self._records[request_id]
            record.status, record.tile = "done", info
            record.dose_e_per_a2 = tile.dose_e_per_a2
            self._count(record)
            self._append({"event": "done", "request_id": request_id, "tile": info, "t_s": time.time()})
            self._tiles[request_id] = tile
            while len(self._tiles) > self.keep_tiles:
                self._tiles.popitem(last=False)
            if self.directory is not None:
                self._on_disk[request_id] = None
                while len(self._on_disk) > self.keep_tiles:
                    old, _ = self._on_disk.popitem(last=False)
                    (self.directory / TILES_DIR / tile_file_name(old)).unlink(missing_ok=True)

    def _write_tile(self, request_id: str, image: np.ndarray) -> None:
        assert self.directory is not None
        final = self.directory / TILES_DIR / tile_file_name(request_id)
        temporary = final.with_suffix(".tmp")
        with open(temporary, "wb") as handle:
            np.save(handle, image, allow_pickle=False)
            handle.flush()
            if self.durable:
                os.fsync(handle.fileno())
        os.replace(temporary, final)

    def failed(self, scan: ScanRequest, reason: str) -> None:
        """Record that ``scan`` was refused or aborted before exposing; its id may be used again."""
        with self._lock:
            self._records.pop(scan.request_id, None)
            self._append(
                {"event": "failed", "request_id": scan.request_id, "reason": reason, "t_s": time.time()}
            )

    def interrupted(self, scan: ScanRequest, reason: str) -> None:
        """Record that the exposure of ``scan`` failed midway: dose counted, id spent."""
        with self._lock:
            record = self._records.get(scan.request_id)
            if record is not None and record.status == "exposing":
                record.status = "interrupted"
                self._count(record)
            self._append(
                {"event": "interrupted", "request_id": scan.request_id, "reason": reason, "t_s": time.time()}
            )

    # ------------------------------------------------------------------ accounting

    @property
    def exposures(self) -> int:
        """Exposures recorded (done or interrupted), over every restart when on disk."""
        return self._exposures

    @property
    def interrupted_exposures(self) -> int:
        """Exposures cut short by a restart or a driver failure (counted in :attr:`exposures`)."""
        return self._interrupted

    @property
    def total_dose_e_per_a2(self) -> float:
        """Sum of the doses of the recorded exposures, e-/Å² (interrupted ones in full)."""
        return self._total_dose

    def close(self) -> None:
        """Close the journal file (records are already on disk)."""
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
