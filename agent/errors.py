"""Typed errors with messages a microscopist can act on.

Every error says what was wrong, the offending value and, where it applies,
the limit it broke and what to do about it. The command-line interface turns
any :class:`MicrographyError` into a one-line message and a non-zero exit.
"""

from __future__ import annotations


class MicrographyError(Exception):
    """Base class of every error Micrography raises on purpose."""


class ConfigError(MicrographyError, ValueError):
    """A configuration file is missing, unreadable or invalid."""


class ScanRequestError(MicrographyError, ValueError):
    """A scan request cannot be executed by this instrument; nothing was exposed."""


class OutsideStageError(ScanRequestError):
    """The requested field of view extends beyond the stage limits."""


class OutOfRangeError(ScanRequestError):
    """A scan parameter (pixel size, dwell, shape, detector) is outside the instrument range."""


class DoseLimitError(ScanRequestError):
    """The scan would push part of the specimen past its per-area dose limit."""


class DriverClosedError(MicrographyError, RuntimeError):
    """The driver was closed; open a new one to acquire again."""


class AcquisitionAborted(MicrographyError, RuntimeError):
    """An acquisition was stopped by :meth:`agent.driver.MicroscopeDriver.abort`.

    Parameters
    ----------
    message : str
        What was stopped, for a person.
    rows_scanned : int
        Scan lines the beam had already covered when the scan stopped; 0 when it never started
        (then nothing was exposed and the request id may be used again). A scan stopped after it
        started has covered at least one line: its id is spent.
    dose_e_per_a2 : float
        Dose delivered, e-/Å², averaged over the requested field: the scan's per-area dose times
        ``rows_scanned / rows``. The scanned band itself received the full per-area dose.
    extent_nm : tuple of float or None
        ``(x_min, x_max, y_min, y_max)`` of the scanned band, nanometres; None when nothing was scanned.
    """

    def __init__(
        self,
        message: str,
        *,
        rows_scanned: int = 0,
        dose_e_per_a2: float = 0.0,
        extent_nm: tuple[float, float, float, float] | None = None,
    ) -> None:
        super().__init__(message)
        self.rows_scanned = int(rows_scanned)
        self.dose_e_per_a2 = float(dose_e_per_a2)
        self.extent_nm = extent_nm

    @property
    def exposed(self) -> bool:
        """True if the beam scanned part of the field before stopping (the request id is spent)."""
        return self.rows_scanned > 0


class DataFileError(MicrographyError, OSError):
    """A data file is missing, unreadable, or lacks an expected key."""


class InvalidImageError(MicrographyError, ValueError):
    """An image has the wrong shape or contains non-finite pixels."""


class LinkError(MicrographyError, ConnectionError):
    """The ZeroMQ link to an instrument server failed or cannot be set up."""


class LinkTimeoutError(LinkError, TimeoutError):
    """The instrument server did not answer within the configured time, after every retry."""


class ProtocolError(LinkError):
    """A message broke the wire protocol (malformed header, wrong frames, bad byte length)."""


class ProtocolVersionError(ProtocolError):
    """The two sides of the link speak different major versions of the protocol."""


class FrameMismatchError(ProtocolError):
    """The frames of a message do not match its header (count or byte length)."""


class MessageTooLargeError(ProtocolError):
    """A message is larger than the receiving side accepts; it was not sent or not processed."""


class AuthenticationError(LinkError):
    """The CURVE handshake was refused: unknown client key, wrong server key or missing keys."""


class RemoteInstrumentError(LinkError):
    """The instrument server reported a failure of its own (a bug or a fault of the instrument)."""


class ReplyExpiredError(RemoteInstrumentError):
    """The request id was exposed, but its tile is no longer kept; it is never exposed again.

    Sent on the wire as ``reply_expired``. Send a new request id to scan the area again.
    """


class JournalWriteError(RemoteInstrumentError):
    """The instrument server cannot write its exposure journal (disk full, file-size limit, I/O error).

    Raised before exposing: nothing was exposed, and the same request id may be retried once the
    server has space again.
    """


class ExposureInterruptedError(MicrographyError, RuntimeError):
    """An exposure was cut short by a restart of the instrument server; it may have delivered dose.

    The request id is spent: retrying it never exposes again. Send a new request to scan the
    area again, after deciding whether the extra dose is acceptable.
    """


class CalibrationError(MicrographyError, RuntimeError):
    """The instrument executed a scan other than the one commanded (scale, centre, rotation or axes).

    The tile cannot be placed on the stage with confidence, so it is not returned. The
    specimen was exposed; the message says which calibration disagreed and by how much.
    """
