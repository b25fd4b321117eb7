"""CURVE security for traffic that leaves the machine: key pairs, key files, allowlists.

The coordinator is the trust anchor. It mints one ephemeral key pair per worker for each
run attempt, hands each worker its secret key through the launcher (a pipe for local
workers, the encrypted agent channel for agents, the actor's arguments for Ray), and
tells every worker the public keys of its peers. Every socket that binds is a CURVE
server whose ZAP handler admits only the public keys of the run's own workers (and, on
the agent port, the agents' keys from ``asyncdni keys``); a peer with another key, or
without CURVE, never gets a message through. Refused keys are counted.

Key files are ZeroMQ's own certificate format (``zmq.auth.create_certificates``):
``NAME.key`` holds the public key, ``NAME.key_secret`` both.
"""
from __future__ import annotations

import ipaddress
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

COORDINATOR = "coordinator"          # name of the coordinator's key pair in a keys directory


class KeyError_(RuntimeError):
    """A key directory or key file is missing or unusable; the message names it."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes      # z85, 40 bytes
    secret: bytes

    @staticmethod
    def new() -> "KeyPair":
        public, secret = zmq.curve_keypair()
        return KeyPair(public, secret)

    @staticmethod
    def from_secret(secret: bytes) -> "KeyPair":
        if not isinstance(secret, bytes) or len(secret) != 40:
            raise KeyError_("a CURVE secret key is 40 z85 characters")
        try:
            return KeyPair(zmq.curve_public(secret), secret)
        except (zmq.ZMQError, ValueError) as e:
            raise KeyError_(f"not a CURVE secret key: {e}") from None


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False                 # a host name: assume it can be reached from elsewhere


def valid_public_key(key) -> bool:
    if isinstance(key, str):
        key = key.encode("ascii", "replace")
    if not isinstance(key, bytes) or len(key) != 40:
        return False
    try:
        zmq.utils.z85.decode(key)
    except (ValueError, KeyError, TypeError):
        return False
    return True


# ------------------------------------------------------------------ key files
MAX_NAME = 64                  # characters in an agent (and key) name


def check_agent_name(name, what: str = "agent name") -> None:
    """An agent's name: also a file name (NAME.key) and a ZeroMQ identity, so letters, digits,
    '-', '_' and '.', not starting with '.', at most MAX_NAME characters."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or name.startswith(".") \
            or not all(c.isalnum() or c in "-_." for c in name):
        shown = name if isinstance(name, str) and len(name) <= MAX_NAME else f"{str(name)[:20]}... ({len(str(name))} characters)"
        raise KeyError_(f"{what} {shown!r}: use 1 to {MAX_NAME} letters, digits, '-', '_' and '.' "
                        f"(not starting with '.')")


def make_keys(directory: str | os.PathLike, names: list[str]) -> list[Path]:
    """``asyncdni keys DIR [NAME ...]``: the coordinator's key pair plus one per name.
    Existing files are never overwritten."""
    d = Path(directory)
    # every name is checked before anything is written: a bad one leaves no keys behind
    for name in names:
        check_agent_name(name, "key name")
        if name == COORDINATOR:
            raise KeyError_(f"key name {name!r} is the coordinator's own; an agent of that name would hold "
                            f"the coordinator's secret key")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise KeyError_(f"key name {dup[0]!r} given twice")
    try:
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
    except OSError as e:
        raise KeyError_(f"cannot create key directory {d}: {e.strerror or e}") from None
    made = []
    for name in [COORDINATOR, *names]:
        if (d / f"{name}.key_secret").exists() or (d / f"{name}.key").exists():
            raise KeyError_(f"{d / name}.key already exists; remove it first or choose another directory")
    for name in [COORDINATOR, *names]:
        public_file, secret_file = zmq.auth.create_certificates(str(d), name)
        os.chmod(secret_file, 0o600)
        made += [Path(public_file), Path(secret_file)]
    return made


def _load(path: Path, secret: bool) -> KeyPair | bytes:
    if not path.is_file():
        raise KeyError_(f"key file {path} not found (make keys with: asyncdni keys {path.parent})")
    try:
        public, sec = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise KeyError_(f"key file {path} is not a ZeroMQ certificate: {e}") from None
    if secret:
        if not sec:
            raise KeyError_(f"key file {path} holds no secret key")
        return KeyPair(public, sec)
    return public


def load_secret(directory: str | os.PathLike, name: str) -> KeyPair:
    return _load(Path(directory) / f"{name}.key_secret", True)


def load_public(directory: str | os.PathLike, name: str) -> bytes:
    return _load(Path(directory) / f"{name}.key", False)


def load_all_public(directory: str | os.PathLike, exclude=(COORDINATOR,)) -> dict[str, bytes]:
    d = Path(directory)
    if not d.is_dir():
        raise KeyError_(f"key directory {d} not found (make one with: asyncdni keys {d})")
    out = {}
    for f in sorted(d.glob("*.key")):
        if f.stem not in exclude:
            out[f.stem] = _load(f, False)
    return out


# ------------------------------------------------------------------ ZAP allowlist
class Allowlist:
    """ZAP handler of one ZeroMQ context: admits CURVE clients whose public key is in the
    allowlist, refuses (and counts) every other. Start it before binding a CURVE server;
    stop it before terminating the context."""

    def __init__(self, ctx: zmq.Context, keys=()):
        self._keys: set[bytes] = {bytes(k) for k in keys}
        self._lock = threading.Lock()
        self.refused = 0
        self.admitted = 0
        self._auth = ThreadAuthenticator(ctx, log=_quiet_log())
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self)

    def allow(self, keys) -> None:
        with self._lock:
            self._keys |= {bytes(k) for k in keys}

    def callback(self, domain, key: bytes) -> bool:  # called from the authenticator thread
        with self._lock:
            ok = bytes(key) in self._keys
            if ok:
                self.admitted += 1
            else:
                self.refused += 1
        return ok

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def _quiet_log():
    import logging
    log = logging.getLogger("asyncdni.zap")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    return log


# ------------------------------------------------------------------ socket options
def make_server(sock: zmq.Socket, keys: KeyPair) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def make_client(sock: zmq.Socket, keys: KeyPair, server_public: bytes) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_public
