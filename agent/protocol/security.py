"""CurveZMQ authentication of the link: key files, allowed clients, socket set-up.

With CURVE on, the instrument server has a key pair, every client has its own,
and the server accepts a connection only from public keys on its allowed list
(checked by a ZAP handler); the traffic is encrypted. Without CURVE the server
should only listen on the loopback interface.

Key files use the ZeroMQ certificate format (as ``zmq.auth`` and czmq write it):
``NAME.key`` holds the public key and may be shared, ``NAME.key_secret`` holds
both keys, is created readable by its owner only, and must never leave the
machine it belongs to. ``micrography keys generate`` writes a pair.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85

from agent.errors import ConfigError
from agent.protocol.framing import require_curve

ZAP_DOMAIN = "micrography"
"""ZAP domain of the server sockets; the authenticator only answers for this domain."""

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"

_log = logging.getLogger("micrography.security")


def _check_key(key: bytes, path: Path, which: str) -> bytes:
    try:
        raw = z85.decode(key)
    except (ValueError, KeyError, IndexError):
        raw = b""
    if len(key) != 40 or len(raw) != 32:
        raise ConfigError(
            f"{path}: the {which} key is not a 40-character Z85 CURVE key; "
            "regenerate the pair with `micrography keys generate`"
        )
    return key


def _read_key_file(path: str | Path) -> tuple[bytes, bytes | None]:
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{path}: key file not found") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read key file ({error.strerror})") from None
    public: bytes | None = None
    secret: bytes | None = None
    for line in lines:
        line = line.strip()
        if line.startswith(b"public-key") and b"=" in line:
            public = line.split(b"=", 1)[1].strip(b" \t'\"")
        elif line.startswith(b"secret-key") and b"=" in line:
            secret = line.split(b"=", 1)[1].strip(b" \t'\"")
    if public is None:
        raise ConfigError(
            f"{path}: no 'public-key = \"...\"' line; this is not a CURVE key file "
            "(make one with `micrography keys generate`)"
        )
    _check_key(public, path, "public")
    if secret is not None:
        _check_key(secret, path, "secret")
    return public, secret


def generate_keys(out_dir: str | Path, name: str = "micrography") -> tuple[Path, Path]:
    """Write a new CURVE key pair: ``NAME.key`` (public) and ``NAME.key_secret`` (owner-only).

    Parameters
    ----------
    out_dir : str or pathlib.Path
        Folder for the two files (created).
    name : str
        File stem, for example ``"agent-workstation"`` or ``"instrument"``.

    Returns
    -------
    public_file, secret_file : pathlib.Path
        The files written.

    Raises
    ------
    ConfigError
        If ``name`` is not a plain file stem or either file already exists (keys are never
        overwritten: a lost secret key locks its owner out).
    """
    require_curve()
    if not name or Path(name).name != name or name.startswith("."):
        raise ConfigError(f"key name {name!r} must be a plain file name without folders, e.g. 'agent'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = out / f"{name}{PUBLIC_SUFFIX}", out / f"{name}{SECRET_SUFFIX}"
    for existing in (public_file, secret_file):
        if existing.exists():
            raise ConfigError(
                f"{existing} already exists; choose another --name or move the old key away "
                "(keys are never overwritten)"
            )
    public, secret = zmq.curve_keypair()
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    body = f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    public_text = (
        f"#   ZeroMQ CURVE public certificate, written by micrography keys generate on {stamp}\n"
        "#   Share it with the peers that must accept this key (the server's --allowed-clients).\n\n" + body
    )
    secret_text = (
        f"#   ZeroMQ CURVE SECRET certificate, written by micrography keys generate on {stamp}\n"
        "#   Keep it on this machine, readable by its owner only; never send it to anyone.\n\n"
        + body
        + f'    secret-key = "{secret.decode()}"\n'
    )
    public_file.write_text(public_text, encoding="utf-8")
    # Created owner-only from the start, never world-readable for a moment.
    descriptor = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(secret_text)
    return public_file, secret_file


def load_public_key(path: str | Path) -> bytes:
    """The Z85 public key in a ``.key`` (or ``.key_secret``) file.

    Parameters
    ----------
    path : str or pathlib.Path
        Key file.

    Returns
    -------
    bytes
        40-character Z85 key.
    """
    return _read_key_file(path)[0]


def load_key_pair(path: str | Path) -> tuple[bytes, bytes]:
    """The Z85 public and secret keys in a ``.key_secret`` file.

    Parameters
    ----------
    path : str or pathlib.Path
        Secret key file.

    Returns
    -------
    public, secret : bytes
        40-character Z85 keys.

    Raises
    ------
    ConfigError
        If the file is missing, malformed, or holds only a public key.
    """
    public, secret = _read_key_file(path)
    if secret is None:
        raise ConfigError(
            f"{path}: holds a public key only; pass the matching {SECRET_SUFFIX} file "
            "(the one with a 'secret-key' line)"
        )
    return public, secret


def load_allowed_clients(path: str | Path) -> frozenset[bytes]:
    """Public keys the server accepts: one ``.key`` file, or every ``*.key`` in a folder.

    Parameters
    ----------
    path : str or pathlib.Path
        A public key file or a folder of them.

    Returns
    -------
    frozenset of bytes
        Z85 public keys.

    Raises
    ------
    ConfigError
        If the path does not exist or holds no public key (an empty list would lock everyone
        out, which is never what was meant).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob(f"*{PUBLIC_SUFFIX}"))
    elif path.exists():
        files = [path]
    else:
        raise ConfigError(f"{path}: allowed-clients file or folder not found")
    keys = frozenset(load_public_key(file) for file in files)
    if not keys:
        raise ConfigError(
            f"{path}: no client public keys ({PUBLIC_SUFFIX} files) found; copy each client's "
            f"NAME{PUBLIC_SUFFIX} here (made with `micrography keys generate`)"
        )
    return keys


@dataclass(frozen=True)
class CurveServerKeys:
    """The server's key pair and the client public keys it accepts.

    Parameters
    ----------
    public, secret : bytes
        The server's Z85 keys.
    allowed_clients : frozenset of bytes
        Z85 public keys of the clients that may connect.
    """

    public: bytes
    secret: bytes
    allowed_clients: frozenset[bytes]

    @classmethod
    def from_files(cls, secret_key_file: str | Path, allowed_clients: str | Path) -> CurveServerKeys:
        """Load the server's ``.key_secret`` file and the allowed client keys (file or folder)."""
        require_curve()
        public, secret = load_key_pair(secret_key_file)
        return cls(public=public, secret=secret, allowed_clients=load_allowed_clients(allowed_clients))

    @classmethod
    def from_settings(
        cls,
        secret_key_file: str | Path | None,
        allowed_clients: str | Path | None,
        names: tuple[str, str] = ("--curve-secret-key", "--allowed-clients"),
    ) -> CurveServerKeys | None:
        """CURVE keys from the two optional settings that turn it on, or None when both are unset.

        Parameters
        ----------
        secret_key_file : str or pathlib.Path or None
            The server's ``.key_secret`` file.
        allowed_clients : str or pathlib.Path or None
            Allowed client public keys (a file or a folder of them).
        names : tuple of str
            How the two settings are called where the user set them (command-line options,
            settings keys), for the error message.

        Returns
        -------
        CurveServerKeys or None
            The keys, or None (CURVE off) when neither setting is given.

        Raises
        ------
        ConfigError
            If only one of the two is given.
        """
        if bool(secret_key_file) != bool(allowed_clients):
            raise ConfigError(
                f"{names[0]} and {names[1]} go together: the server's key pair and the public keys of "
                "the clients it accepts (make both with `micrography keys generate`)"
            )
        if not secret_key_file or not allowed_clients:
            return None
        return cls.from_files(secret_key_file, allowed_clients)

    def apply(self, socket: zmq.Socket[Any]) -> None:
        """Make ``socket`` (ROUTER or PUB, before bind) a CURVE server checked by the ZAP handler."""
        socket.curve_server = True
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret
        socket.zap_domain = ZAP_DOMAIN.encode()


@dataclass(frozen=True)
class CurveClientKeys:
    """A client's key pair and the server public key it expects.

    Parameters
    ----------
    public, secret : bytes
        The client's Z85 keys.
    server_public : bytes
        The server's Z85 public key; a server without the matching secret key cannot answer.
    """

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def from_files(cls, secret_key_file: str | Path, server_public_key_file: str | Path) -> CurveClientKeys:
        """Load the client's ``.key_secret`` file and the server's ``.key`` file."""
        require_curve()
        public, secret = load_key_pair(secret_key_file)
        return cls(public=public, secret=secret, server_public=load_public_key(server_public_key_file))

    def apply(self, socket: zmq.Socket[Any]) -> None:
        """Make ``socket`` (DEALER or SUB, before connect) a CURVE client of the server."""
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


class _AllowedClients:
    """ZAP credentials provider: accept listed keys, log every refusal."""

    def __init__(self, allowed: frozenset[bytes], logger: logging.Logger) -> None:
        self._allowed = allowed
        self._log = logger

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self._allowed:
            return True
        self._log.warning(
            "refused a CURVE client with unknown public key %s (add its .key file to --allowed-clients "
            "to let it in)",
            key.decode(errors="replace"),
        )
        return False


def start_authenticator(
    context: zmq.Context[Any], keys: CurveServerKeys, logger: logging.Logger | None = None
) -> Any:
    """Start the ZAP handler that lets only ``keys.allowed_clients`` in; stop it with ``.stop()``.

    Parameters
    ----------
    context : zmq.Context
        The context of the server sockets (ZAP is per context).
    keys : CurveServerKeys
        Server keys and allowed clients.
    logger : logging.Logger, optional
        Where refusals are logged.

    Returns
    -------
    zmq.auth.thread.ThreadAuthenticator
        The running authenticator.
    """
    from zmq.auth.thread import ThreadAuthenticator

    authenticator = ThreadAuthenticator(context, log=logging.getLogger("micrography.zap"))
    authenticator.start()
    authenticator.configure_curve_callback(
        ZAP_DOMAIN, credentials_provider=_AllowedClients(keys.allowed_clients, logger or _log)
    )
    return authenticator
