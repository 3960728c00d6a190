"""Checks of the files a command reads and writes, made before any exposure or computation.

A command that would expose the specimen, train a model or analyse a large image
first checks that its inputs exist and that it can write its outputs, so that a
mistyped path costs a second, not dose or an hour of work. Each check raises
:class:`~agent.errors.ConfigError` with one line that names the path and the
problem. Nothing here creates a file or folder: a refused command leaves the disk
as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from agent.errors import ConfigError

JOURNAL_NAME = "journal.h5"
"""File name of a session journal inside its session folder."""


def input_file(path: str | Path, what: str) -> Path:
    """An existing, readable file.

    Parameters
    ----------
    path : str or pathlib.Path
        The file given by the user.
    what : str
        What it is, for the message (``"--checkpoint"``, ``"image"``).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ConfigError
        If it does not exist, is a folder or cannot be read.

    Examples
    --------
    >>> input_file("/nonexistent/model.pt", "--checkpoint")
    Traceback (most recent call last):
    ...
    agent.errors.ConfigError: --checkpoint /nonexistent/model.pt: no such file
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder, not a file")
    if not path.exists():
        raise ConfigError(f"{what} {path}: no such file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path}: cannot read it (permission denied)")
    return path


def input_journal(path: str | Path, what: str = "journal") -> Path:
    """A session journal: the file itself, or the session folder that holds ``journal.h5``.

    Parameters
    ----------
    path : str or pathlib.Path
        A journal file or a session folder.
    what : str
        What it is, for the message.

    Returns
    -------
    pathlib.Path
        The journal file.

    Raises
    ------
    ConfigError
        If the path does not exist, or is a folder without ``journal.h5``.
    """
    path = Path(path)
    if path.is_dir():
        inside = path / JOURNAL_NAME
        if inside.is_file():
            return inside
        raise ConfigError(
            f"{what} {path} is a folder without {JOURNAL_NAME}; give the session's journal file "
            f"(DIR/{JOURNAL_NAME}, written by `micrography run`)"
        )
    return input_file(path, what)


def output_folder(path: str | Path, what: str = "--out") -> Path:
    """A folder the command may create or write into; checked, not created.

    Parameters
    ----------
    path : str or pathlib.Path
        The output folder (it may not exist yet).
    what : str
        The option that named it, for the message.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ConfigError
        If ``path`` or one of its parents is a file, or the nearest existing folder cannot be
        written (read-only file system, permissions).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder; choose a folder for the outputs")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is a file, not a folder")
    _require_writable(existing, what, path)
    return path


def output_file(
    path: str | Path,
    what: str = "--out",
    *,
    suffixes: Sequence[str] | None = None,
    overwrite: bool = True,
) -> Path:
    """A file the command may write; checked, not created.

    Parameters
    ----------
    path : str or pathlib.Path
        The output file.
    what : str
        The option that named it, for the message.
    suffixes : sequence of str, optional
        Accepted file name endings (``(".npy", ".tif")``), compared case-insensitively.
    overwrite : bool
        Whether an existing file may be replaced; False protects data that cost dose or hours.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ConfigError
        If the name has another ending, the path is a folder, the file exists and may not be
        replaced, or its folder cannot be written.
    """
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ConfigError(f"{what} {path}: use a file name ending in {', '.join(suffixes)}")
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise ConfigError(f"{what} {path} exists; choose another name or pass --overwrite to replace it")
    output_folder(path.parent, what)
    return path


def _require_writable(folder: Path, what: str, wanted: Path) -> None:
    """Raise unless a file can be created in ``folder`` (a real probe: root passes ``access``)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".micrography-probe-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"{what} {wanted}: cannot write to {folder} ({reason})") from None
