"""The session journal: an append-only HDF5 record of every step of a session.

Each step stores the request, the tile (image and metadata), the columns
found, the scores, the surrogate summary, the decision that followed and the
timings. The journal is written in HDF5's single-writer/multiple-reader (SWMR)
mode: all datasets are created up front and only ever extended, data first and
the step's index row last, with a flush after every step. A reader sees a
consistent prefix of steps at any time, and a session killed mid-step leaves a
file whose complete steps can all be read back (:func:`read_journal` says what
was recovered and what was lost).

A session that ends (its budget spent, or nothing admissible left) appends one last record
of kind ``"end"`` (:meth:`SessionJournal.append_end`); it is not a step, and a journal that has
it holds a complete session, which resuming would not continue. An interrupted session (killed,
Ctrl-C, an instrument error) has none.

Layout (one row of each ``*_index`` dataset per step, and one for the end record)::

    /                      attrs: format, version, created, config (JSON), instrument (JSON),
                           session_id (version 2: the prefix of the session's request ids)
    /records, /record_index        JSON record of each step (bytes, (offset, length))
    /images, /image_index          float32 images, flattened ((offset, rows, cols))
    /columns/<field>, /column_index  the Columns table of each step ((offset, count))

Version 2 added the session id and the end record; version 1 journals are still read (and
resumed, with the unprefixed request ids they were recorded with).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from agent.columns import Columns, VacancySites
from agent.errors import MicrographyError

JOURNAL_FORMAT = "micrography-session-journal"
JOURNAL_VERSION = 2
READABLE_VERSIONS: tuple[int, ...] = (1, 2)
"""Journal versions this Micrography reads (it writes :data:`JOURNAL_VERSION`)."""
END_KIND = "end"
"""``kind`` of the record that closes a complete session (not a step)."""
_COLUMN_DTYPES: dict[str, Any] = {
    "x_nm": np.float64, "y_nm": np.float64, "row_px": np.float64, "col_px": np.float64,
    "intensity": np.float64, "scattering": np.float64, "peak_height": np.float64,
    "background": np.float64, "width_px": np.float64, "species": np.int8, "abnormal": np.bool_,
    "quality": np.float64,
}  # fmt: skip


class JournalError(MicrographyError, OSError):
    """A journal cannot be created, written or read."""


@dataclass
class JournalStep:
    """One step of a session as recorded.

    Parameters
    ----------
    index : int
        Step number, from 0.
    record : dict
        JSON record: ``kind``, ``request``, tile metadata, scores, decision, timings, ...
    image : numpy.ndarray or None
        The tile image (None if the step stored none).
    columns : Columns or None
        The columns found (None if the step stored none).
    """

    index: int
    record: dict[str, Any]
    image: np.ndarray | None = None
    columns: Columns | None = None


@dataclass
class JournalContents:
    """Everything recovered from a journal file.

    Parameters
    ----------
    path : pathlib.Path
        The file.
    config : dict
        Session configuration recorded at creation.
    instrument : dict
        Instrument description recorded at creation.
    steps : list of JournalStep
        Complete steps, in order.
    problems : list of str
        What could not be recovered, if anything.
    end : dict or None
        The end record of a complete session (``stop_reason``, ``budget``, ...), None when the
        session was interrupted or is still running.
    session_id : str or None
        The session's id (prefix of its request ids); None for a version-1 journal.
    """

    path: Path
    config: dict[str, Any]
    instrument: dict[str, Any]
    steps: list[JournalStep] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    end: dict[str, Any] | None = None
    session_id: str | None = None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


class SessionJournal:
    """Append-only writer of a session journal (SWMR HDF5).

    Parameters
    ----------
    path : str or pathlib.Path
        The journal file; must not exist yet (use :meth:`continue_from` to resume).
    config : dict
        Session configuration (JSON-serialisable).
    instrument : dict
        Instrument description (JSON-serialisable).
    session_id : str, optional
        The session's id, stored as the ``session_id`` attribute.

    Examples
    --------
    Not run as a test (it writes a file and needs a ``tile``)::

        with SessionJournal("run.h5", config={}, instrument={}) as journal:
            journal.append({"kind": "survey"}, image=tile.image)
    """

    def __init__(
        self,
        path: str | Path,
        config: dict[str, Any],
        instrument: dict[str, Any],
        session_id: str | None = None,
    ) -> None:
        self.path = Path(path)
        if self.path.exists():
            raise JournalError(
                f"{self.path}: a journal already exists; resume it with `micrography run --resume "
                f"{self.path}` or choose another output"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = h5py.File(self.path, "w", libver="latest")
        except OSError as error:
            raise JournalError(
                f"{self.path}: cannot write the journal there ({error}); choose another output folder"
            ) from None
        attrs = self._file.attrs
        attrs["format"] = JOURNAL_FORMAT
        attrs["version"] = JOURNAL_VERSION
        attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        attrs["config"] = json.dumps(config, default=_json_default)
        attrs["instrument"] = json.dumps(instrument, default=_json_default)
        if session_id is not None:
            attrs["session_id"] = session_id
        self._create(self._file)
        # From here on nothing may be created, only extended: the file stays readable after a crash.
        self._file.swmr_mode = True
        self.steps = 0

    @staticmethod
    def _create(file: h5py.File) -> None:
        def extendable(name: str, dtype: Any, width: int | None = None, chunk: int = 4096) -> None:
            shape = (0,) if width is None else (0, width)
            maxshape = (None,) if width is None else (None, width)
            chunks = (chunk,) if width is None else (max(1, chunk // width), width)
            file.create_dataset(name, shape=shape, maxshape=maxshape, dtype=dtype, chunks=chunks)

        extendable("records", np.uint8, chunk=16384)
        extendable("record_index", np.int64, width=2, chunk=256)
        extendable("images", np.float32, chunk=1 << 18)
        extendable("image_index", np.int64, width=3, chunk=384)
        for name, dtype in _COLUMN_DTYPES.items():
            extendable(f"columns/{name}", dtype, chunk=8192)
        extendable("column_index", np.int64, width=2, chunk=256)

    @staticmethod
    def _extend(dataset: h5py.Dataset, values: np.ndarray) -> int:
        """Append rows; returns the offset they start at."""
        start = dataset.shape[0]
        dataset.resize(start + values.shape[0], axis=0)
        if values.shape[0]:
            dataset[start:] = values
        return start

    def append(
        self, record: dict[str, Any], image: np.ndarray | None = None, columns: Columns | None = None
    ) -> int:
        """Record one step and flush it to disk.

        Parameters
        ----------
        record : dict
            JSON-serialisable step record.
        image : numpy.ndarray, optional
            The tile image.
        columns : Columns, optional
            The columns found in the tile.

        Returns
        -------
        int
            The step index.
        """
        file = self._file
        try:
            if image is not None:
                image = np.asarray(image, dtype=np.float32)
                offset = self._extend(file["images"], image.ravel())
                image_row = np.array([[offset, image.shape[0], image.shape[1]]], dtype=np.int64)
            else:
                image_row = np.array([[-1, 0, 0]], dtype=np.int64)
            if columns is not None:
                offsets = [
                    self._extend(file[f"columns/{name}"], np.asarray(getattr(columns, name), dtype=dtype))
                    for name, dtype in _COLUMN_DTYPES.items()
                ]
                column_row = np.array([[offsets[0], len(columns)]], dtype=np.int64)
                record = {
                    **record,
                    "columns_meta": {
                        "pixel_size_nm": columns.pixel_size_nm,
                        "lattice_spacing_nm": columns.lattice_spacing_nm,
                        "reason": columns.reason,
                        "tile_id": columns.tile_id,
                        "masked_pixels": columns.masked_pixels,
                        "material": columns.material,
                        "vacancies": columns.vacancies.to_record(),
                    },
                }
            else:
                column_row = np.array([[-1, 0]], dtype=np.int64)
            payload = np.frombuffer(json.dumps(record, default=_json_default).encode("utf-8"), dtype=np.uint8)
            record_offset = self._extend(file["records"], payload)
            file.flush()
            # The index rows are the commit: a reader counts a step only once all three exist.
            self._extend(file["image_index"], image_row)
            self._extend(file["column_index"], column_row)
            self._extend(file["record_index"], np.array([[record_offset, payload.size]], dtype=np.int64))
            file.flush()
        except (OSError, ValueError) as error:
            raise JournalError(f"{self.path}: could not record step {self.steps} ({error})") from None
        self.steps += 1
        return self.steps - 1

    def append_end(self, record: dict[str, Any]) -> None:
        """Close a complete session: append its end record (not a step) and flush it.

        Parameters
        ----------
        record : dict
            JSON-serialisable summary of how the session ended (``stop_reason``, ``budget``, ...);
            its ``kind`` is set to :data:`END_KIND`.
        """
        self.append({**record, "kind": END_KIND})
        self.steps -= 1  # the end record is no step

    def close(self) -> None:
        """Flush and close the file."""
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> SessionJournal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @classmethod
    def continue_from(
        cls, path: str | Path, contents: JournalContents | None = None
    ) -> tuple[SessionJournal, JournalContents]:
        """Reopen an interrupted journal for appending, keeping every complete step.

        The recovered steps are rewritten into a fresh file at the same path, so a file left
        in an unclean state by a crash never needs repair tools. The old file is kept beside
        it as ``<name>.interrupted.h5`` while the steps are copied and removed once every one
        is in the new file (it holds nothing more that can be read: at most a torn last step);
        if the copy fails, it stays and the error says where. An end record (a complete
        session whose budget was raised) is not copied.

        Parameters
        ----------
        path : str or pathlib.Path
            The journal of the interrupted session.
        contents : JournalContents, optional
            The journal as just read with :func:`read_journal` (read again when not given).

        Returns
        -------
        journal : SessionJournal
            Writer positioned after the last complete step.
        contents : JournalContents
            What was recovered.
        """
        path = Path(path)
        if contents is None:
            recover_rewrite(path)
            contents = read_journal(path)
        backup = rewrite_backup(path)
        try:
            if backup.exists():
                backup.unlink()
            os.replace(path, backup)
        except OSError as error:
            raise JournalError(
                f"{path}: cannot rewrite the journal to continue it ({error}); copy it to a writable "
                "folder and resume from there"
            ) from None
        try:
            journal = cls(path, contents.config, contents.instrument, contents.session_id)
            for step in contents.steps:
                record = {key: value for key, value in step.record.items() if key != "columns_meta"}
                journal.append(record, step.image, step.columns)
        except JournalError as error:
            raise JournalError(f"{error}; the journal as it was is kept in {backup}") from None
        backup.unlink()
        return journal, contents


def rewrite_backup(path: str | Path) -> Path:
    """Where :meth:`SessionJournal.continue_from` keeps a journal while rewriting it.

    Parameters
    ----------
    path : str or pathlib.Path
        The journal.

    Returns
    -------
    pathlib.Path
        ``<name>.interrupted.h5`` beside it.
    """
    path = Path(path)
    return path.with_name(path.stem + ".interrupted.h5")


def _complete_steps(path: Path) -> int:
    """Complete index rows of a journal (steps and end record), without reading them; -1 if unreadable."""
    try:
        with _open_for_reading(path) as file:
            return min(len(file[name]) for name in ("record_index", "image_index", "column_index"))
    except (JournalError, OSError, KeyError):
        return -1


def recover_rewrite(path: str | Path) -> bool:
    """Put back a journal whose rewrite for a resume was cut short (Ctrl-C, a full disk).

    ``continue_from`` moves the journal aside, copies its steps into a new file and removes the
    moved one. If a moved journal is still there and holds more than the file at ``path`` (or
    ``path`` is gone), the copy was cut short: the moved journal is put back. A moved journal
    holding no more (left by an older Micrography) is removed.

    Parameters
    ----------
    path : str or pathlib.Path
        The journal.

    Returns
    -------
    bool
        True if the moved journal was put back.
    """
    path = Path(path)
    backup = rewrite_backup(path)
    if not backup.is_file():
        return False
    if not path.exists() or _complete_steps(backup) > _complete_steps(path):
        os.replace(backup, path)
        return True
    backup.unlink()
    return False


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _stored_end_of_file(path: Path) -> int | None:
    """End-of-file address recorded in an HDF5 superblock of version 2 or 3 at offset 0 (bytes), if any."""
    with path.open("rb") as handle:
        head = handle.read(64)
    if len(head) < 12 or head[:8] != _HDF5_SIGNATURE or head[8] < 2:
        return None
    offsets = head[9]
    start = 12 + 2 * offsets  # after the base address and the superblock-extension address
    if len(head) < start + offsets:
        return None
    return int.from_bytes(head[start : start + offsets], "little")


def _refuse_truncated(path: Path) -> None:
    """Raise if the file is shorter than its superblock says.

    A SWMR reader skips HDF5's own truncation check (a live journal grows) and then retries
    every read past the end of the file for many minutes, so a truncated copy would hang the
    reader instead of failing.
    """
    for _ in range(3):
        stored, size = _stored_end_of_file(path), path.stat().st_size
        if stored is None or stored <= size:
            return
        time.sleep(0.2)  # a live writer may have grown the superblock's end before the file
    raise JournalError(
        f"{path}: the file is truncated ({size:,} of {stored:,} bytes; copied while it was being written, "
        "or the disk filled up) and cannot be opened; nothing could be recovered from it. Copy the "
        "journal again from where the session wrote it"
    )


def _open_for_reading(path: Path) -> h5py.File:
    if path.is_dir():
        hint = " (it holds journal.h5: give that file)" if (path / "journal.h5").is_file() else ""
        raise JournalError(f"{path} is a folder, not a session journal file{hint}")
    if not path.exists():
        raise JournalError(f"{path}: journal not found")
    _refuse_truncated(path)
    try:
        return h5py.File(path, "r", libver="latest", swmr=True, locking=False)
    except OSError as error:
        raise JournalError(
            f"{path}: cannot be opened as an HDF5 journal ({error}); nothing could be recovered from it"
        ) from None


def read_journal(path: str | Path) -> JournalContents:
    """Read every complete step of a journal, and say what could not be recovered.

    Parameters
    ----------
    path : str or pathlib.Path
        The journal file.

    Returns
    -------
    JournalContents
        Configuration, instrument, complete steps and a list of problems (empty for a clean file).

    Raises
    ------
    JournalError
        If the file is missing, is not HDF5, or is not a Micrography journal.
    """
    path = Path(path)
    with _open_for_reading(path) as file:
        if file.attrs.get("format") != JOURNAL_FORMAT:
            raise JournalError(f"{path}: not a Micrography session journal")
        if int(file.attrs.get("version", -1)) not in READABLE_VERSIONS:
            raise JournalError(
                f"{path}: journal version {file.attrs.get('version')} but this Micrography reads "
                f"versions {', '.join(map(str, READABLE_VERSIONS))}; use the Micrography that wrote it"
            )
        session_id = file.attrs.get("session_id")
        config = json.loads(file.attrs["config"])
        if "checkpoint" in config and "recalibrate_checkpoint" not in config:
            # Recorded before checkpoints were recalibrated on the start tiles: it used its
            # checkpoint as trained, and so must its resume and replay.
            config["recalibrate_checkpoint"] = False
        # Recorded before the pipelined loop: the session was sequential, and so is its replay.
        config.setdefault("lookahead_tiles", 0)
        contents = JournalContents(
            path=path,
            config=config,
            instrument=json.loads(file.attrs["instrument"]),
            session_id=None if session_id is None else str(session_id),
        )
        try:
            record_index = file["record_index"][()]
            image_index = file["image_index"][()]
            column_index = file["column_index"][()]
        except (KeyError, OSError) as error:
            contents.problems.append(f"the step index is unreadable ({error}); no step could be recovered")
            return contents
        complete = min(len(record_index), len(image_index), len(column_index))
        if complete < max(len(record_index), len(image_index), len(column_index)):
            contents.problems.append("the last step was interrupted while being written and is lost")
        for index in range(complete):
            try:
                step = _read_step(file, index, record_index, image_index, column_index)
                if step.record.get("kind") == END_KIND:
                    contents.end = step.record
                    continue
                contents.steps.append(step)
            except (OSError, ValueError, KeyError) as error:
                contents.problems.append(
                    f"step {index} is unreadable ({error}); steps 0-{index - 1} were recovered"
                )
                break
    return contents


class JournalTail:
    """Reads a journal's new steps as they are written (by this process or another one).

    Parameters
    ----------
    path : str or pathlib.Path
        The journal file; its header is read here.

    Raises
    ------
    JournalError
        If the file is missing or not a readable Micrography journal.

    Examples
    --------
    ::

        tail = JournalTail("runs/session-guided-seed0/journal.h5")
        while tail.end is None:
            for step in tail.poll():
                print(step.index, step.record["kind"])
            time.sleep(0.2)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with _open_for_reading(self.path) as file:
            if file.attrs.get("format") != JOURNAL_FORMAT:
                raise JournalError(f"{self.path}: not a Micrography session journal")
            self.config: dict[str, Any] = json.loads(file.attrs["config"])
            self.instrument: dict[str, Any] = json.loads(file.attrs["instrument"])
            session_id = file.attrs.get("session_id")
            self.session_id = None if session_id is None else str(session_id)
        self.next_index = 0
        """Index of the next step :meth:`poll` will return."""
        self.end: dict[str, Any] | None = None
        """The end record, once the session has ended."""

    def poll(self) -> list[JournalStep]:
        """The complete steps written since the last call, oldest first (the end record is kept apart)."""
        with h5py.File(self.path, "r", libver="latest", swmr=True, locking=False) as file:
            indexes = [file[name][()] for name in ("record_index", "image_index", "column_index")]
            complete = min(len(index) for index in indexes)
            steps = []
            while self.next_index < complete:
                step = _read_step(file, self.next_index, *indexes)
                self.next_index += 1
                if step.record.get("kind") == END_KIND:
                    self.end = step.record
                else:
                    steps.append(step)
        return steps


def _read_step(
    file: h5py.File, index: int, record_index: np.ndarray, image_index: np.ndarray, column_index: np.ndarray
) -> JournalStep:
    offset, length = record_index[index]
    record = json.loads(file["records"][offset : offset + length].tobytes().decode("utf-8"))
    image = None
    image_offset, rows, cols = image_index[index]
    if image_offset >= 0:
        image = file["images"][image_offset : image_offset + rows * cols].reshape(rows, cols)
    columns = None
    column_offset, count = column_index[index]
    if column_offset >= 0:
        arrays = {
            name: file[f"columns/{name}"][column_offset : column_offset + count] for name in _COLUMN_DTYPES
        }
        meta = dict(record.get("columns_meta", {}))
        meta["vacancies"] = VacancySites.from_record(meta.get("vacancies"))
        columns = Columns(**arrays, **meta)
    return JournalStep(index=index, record=record, image=image, columns=columns)


def iter_steps(path: str | Path) -> Iterator[JournalStep]:
    """Iterate over the complete steps of a journal (see :func:`read_journal`)."""
    yield from read_journal(path).steps
