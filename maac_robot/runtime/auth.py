"""CurveZMQ keys and the rules for who may reach the robot: torch-free, used by the sim, drivers and the controller.

Why CURVE: off loopback anyone on the network could otherwise send actions to the robot. With a
server key pair on the robot side and an authorised client key per controller, an unauthenticated
peer fails the CURVE handshake inside libzmq: it gets no reply, reaches no application code (so it
cannot flood the log or hold memory) and never owns an episode. Keys are the files `zmq.auth`
writes (`NAME.key` public, `NAME.key_secret` secret + public), so the usual ZeroMQ tooling reads them.

The rule: binding anything other than loopback, an ipc path or inproc without keys is refused
(`--insecure` allows it with a warning).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import zmq

from maac_robot.runtime.errors import UserError

log = logging.getLogger("maac_robot.runtime.auth")


ZAP_DOMAIN = "maac-robot"


class AuthError(UserError):
    """Keys that cannot be used (missing, unreadable, wrong kind) or a bind that needs keys."""


KEYS_HINT = ("make keys with `maac-robot keys keys --name server` and `maac-robot keys keys/clients --name "
             "controller`, then start the sim with `--server-key keys/server.key_secret --authorized keys/clients` "
             "and the controller with `--client-key keys/clients/controller.key_secret --server-public "
             "keys/server.key`")


def create_keys(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write a CURVE key pair `NAME.key` and `NAME.key_secret` (the secret file mode 0600); refuse to overwrite."""
    import zmq.auth

    if not name or "/" in name or name.startswith("."):
        raise AuthError(f"key name {name!r} must be a plain file name such as 'server' or 'controller'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise AuthError(f"{path} exists: remove it first or choose another --name (keys are never overwritten)")
    public_file, secret_file = zmq.auth.create_certificates(directory, name)
    os.chmod(secret_file, 0o600)
    return Path(public_file), Path(secret_file)


def _load(path: str | Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    path = Path(path)
    if not path.is_file():
        raise AuthError(f"key file not found: {path}; {KEYS_HINT}")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as err:
        raise AuthError(f"{path} is not a ZeroMQ CURVE key file ({err}); {KEYS_HINT}") from None
    if secret and secret_key is None:
        raise AuthError(f"{path} holds only a public key; pass the NAME.key_secret file here")
    return public, secret_key


def load_public_key(path: str | Path) -> bytes:
    """The z85 public key in `NAME.key` (or in a `.key_secret` file, which holds both)."""
    return _load(path, secret=False)[0]


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, path: str | Path) -> KeyPair:
        public, secret = _load(path, secret=True)
        assert secret is not None
        return cls(public, secret)


@dataclass(frozen=True)
class ClientCurve:
    """A controller's key pair and the robot's public key: what `RobotClient` needs to connect over CURVE."""

    keys: KeyPair
    server_public: bytes

    @classmethod
    def load(cls, client_key: str | Path, server_public: str | Path) -> ClientCurve:
        return cls(KeyPair.load(client_key), load_public_key(server_public))

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_serverkey = self.server_public


def client_curve(client_key: str | Path | None, server_public: str | Path | None) -> ClientCurve | None:
    """Both files or neither: half a CURVE setup is a configuration mistake, said as one line."""
    if client_key is None and server_public is None:
        return None
    if client_key is None or server_public is None:
        raise AuthError("CURVE needs both --client-key (this controller's NAME.key_secret) and --server-public "
                        "(the robot's NAME.key)")
    return ClientCurve.load(client_key, server_public)


def authorized_keys(directory: str | Path) -> set[bytes]:
    """Every public key in `directory`'s `*.key` files; an empty or missing directory is an error, not 'allow all'."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AuthError(f"authorized-keys directory not found: {directory}; {KEYS_HINT}")
    keys = {load_public_key(p) for p in sorted(directory.glob("*.key"))}
    if not keys:
        raise AuthError(f"no public keys (*.key) in {directory}: copy each controller's NAME.key there")
    return keys


class ServerAuth:
    """CURVE on the robot's socket plus a ZAP thread that admits only the authorised public keys.

    The ZAP reply's user id is the client's z85 public key, so the robot can tell an admin peer
    (`is_admin`) from an ordinary controller by the key it proved, not by anything it claims.
    """

    def __init__(self, server_key: str | Path, authorized: str | Path, admin_key: str | Path | None,
                 context: zmq.Context) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self.keys = KeyPair.load(server_key)
        self.allowed = authorized_keys(authorized)
        self.admin = load_public_key(admin_key) if admin_key is not None else None
        if self.admin is not None:
            self.allowed.add(self.admin)
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("maac_robot.runtime.auth.zap"))
        # denials are per-connection events an attacker controls: never above DEBUG
        self._auth.log.setLevel(logging.WARNING)
        self._auth.start()
        self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: admit a client whose (z85) public key is authorised."""
        return key in self.allowed

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_server = True
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.zap_domain = ZAP_DOMAIN.encode()

    def is_admin(self, frame: zmq.Frame) -> bool:
        if self.admin is None:
            return False
        try:
            return frame.get("User-Id").encode() == self.admin
        except (zmq.ZMQError, AttributeError):
            return False

    def stop(self) -> None:
        self._auth.stop()


def is_local_endpoint(endpoint: str) -> bool:
    """ipc/inproc, or tcp on a loopback address: nobody off this machine can connect."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    try:
        host = urlparse(endpoint).hostname or ""
    except ValueError:  # e.g. tcp://[127.0.0.1]:5555: not a form libzmq binds either
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a DNS name: may be reachable from elsewhere


def check_bind_security(endpoint: str, *, keyed: bool, insecure: bool) -> None:
    """Refuse a non-local bind without CURVE keys unless `insecure` (then warn once)."""
    if keyed or is_local_endpoint(endpoint):
        return
    if not insecure:
        raise AuthError(f"refusing to bind {endpoint} without keys: any host that reaches it could drive the "
                        f"robot. {KEYS_HINT}; or bind 127.0.0.1; or pass --insecure on a network you trust")
    log.warning("binding %s WITHOUT authentication (--insecure): any peer that reaches it can drive the robot",
                endpoint)

