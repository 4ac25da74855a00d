"""Ray's token authentication for the audit: a local Ray that only this user can drive, and one line saying what to
set when a cluster refuses the driver. Imports ray (auditor.pipeline is the only ray importer).

What Ray does (read in the installed sources of 2.52.0 and 2.60.0; versions between not checked):
- Ray 2.50-2.51 have no token authentication: anyone who reaches a Ray's ports can run code in it.
- From 2.52, `RAY_AUTH_MODE=token` turns it on; the token comes from RAY_AUTH_TOKEN, else the file
  RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token. 2.52 leaves it off unless asked.
- 2.60 turns it on for a new local `ray.init()` when RAY_AUTH_MODE is unset (writing ~/.ray/auth_token if missing,
  with the process umask: readable by every local user under the usual 022), and for `ray start --head` only when a
  token already exists. A driver joining a cluster by address needs RAY_AUTH_MODE=token and the token.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import stat
from pathlib import Path

logger = logging.getLogger(__name__)

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
# What to set, in every message about a refused or missing token.
TOKEN_HELP = (
    f"set {AUTH_MODE_ENV}=token and {TOKEN_ENV}=<the cluster's token> (or {TOKEN_PATH_ENV}=<a file holding it>) "
    "in the environment of the driver; on KubeRay the token is the auth_token key of the cluster's Secret "
    "(README, Security)"
)


def has_token_auth() -> bool:
    """Whether the installed Ray has token authentication (Ray >= 2.52)."""
    try:
        from ray._raylet import AuthenticationTokenLoader  # noqa: F401
    except ImportError:
        return False
    return True


def default_token_path() -> Path:
    """Ray's own default: ~/.ray/auth_token."""
    return Path.home() / ".ray" / "auth_token"


def secure_local_ray() -> None:
    """Before a new local `ray.init()`: token authentication on, with a token only this user can read.

    RAY_AUTH_MODE set by the user (`disabled` included) is kept as it is. Unset, it becomes `token` where Ray has
    it, as Ray 2.60 does by itself, so Ray 2.52-2.59 are covered too; the token file Ray would create with the
    umask is created here with mode 0600 (and made 0600 when it exists readable by others). Ray 2.50-2.51 cannot
    do this: a warning says so once.
    """
    if os.environ.get(AUTH_MODE_ENV) is not None:
        return
    if not has_token_auth():
        import ray

        logger.warning(
            "Ray %s has no token authentication (Ray >= 2.52 has it): while this audit runs, anyone who can reach "
            "this machine's Ray ports can run code as you. On a shared host use Ray >= 2.52, or run the audit in a "
            "container or VM of its own (README, Security).",
            ray.__version__,
        )
        return
    os.environ[AUTH_MODE_ENV] = "token"
    if not (os.environ.get(TOKEN_ENV) or os.environ.get(TOKEN_PATH_ENV)):
        try:
            ensure_private_token(default_token_path())
        except (
            OSError,
            RuntimeError,
        ) as exc:  # a read-only or missing HOME (RuntimeError: no home directory)
            # A token for this run only, in the environment this process and its Ray inherit: no file needed.
            os.environ[TOKEN_ENV] = secrets.token_hex(32)
            logger.warning(
                "Ray token authentication: cannot write a token file (%s); this run uses one of its own", exc
            )
    refresh_ray_config()


def refresh_ray_config() -> None:
    """Make this process's Ray see the new RAY_AUTH_MODE and token: Ray reads both into its config and token cache
    at import, and a driver that kept `disabled` would be refused by the GCS it starts (as Ray's own
    `_enable_token_auth` does: Config.initialize, then the token loader's reset_cache)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def ensure_private_token(path: Path) -> None:
    """A token file only its owner can read: created (0600, in a 0700 folder) when missing, tightened when not."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077 and path.stat().st_uid == os.getuid():
            path.chmod(0o600)
            logger.warning("%s was readable by other users (mode %o); made it 0600", path, mode)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # as Ray's own generator: 256 random bits, hex
    logger.info("Ray token authentication: generated a token in %s (mode 0600)", path)


def check_token(address: str) -> None:
    """Before `ray.init(address=...)`: raise Ray's AuthenticationError within a second when the cluster at `address`
    (host:port) refuses this driver, where ray.init retries for 20 s and then raises a ConnectionError.

    Any other failure (unreachable, not started yet) is left to ray.init, which reports it as before.
    """
    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit() or not has_token_auth():
        return
    try:  # a GCS that does not answer: a GcsClient would wait 40 s before ray.init's own retries
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except OSError:
        return
    try:  # Ray's private modules, as 2.52-2.60 have them; elsewhere ray.init reports a refusal by itself
        from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
        from ray._raylet import GcsClient
    except ImportError:
        return

    # RAY_AUTH_MODE=token without a token: Ray's own error (a GcsClient would abort the process instead).
    ensure_token_if_auth_enabled(None, create_token_if_missing=False)
    try:
        GcsClient(address=address)
    except Exception as exc:
        if is_auth_refusal(exc):
            raise


def is_auth_refusal(exc: BaseException | None) -> bool:
    """Whether connecting to a Ray failed because it wants a token the driver lacks or got wrong: the exception or
    one it was raised from (ray.init's ConnectionError wraps the GCS client's error)."""
    return _auth_error_in(exc) is not None


def refusal_message(address: str, exc: BaseException) -> str:
    """One line: which Ray refused, why (Ray's first sentence, no traceback) and what to set."""
    cause = _auth_error_in(exc) or exc
    text = str(cause).strip()
    reason = text.splitlines()[-1].split(". ")[0].rstrip(".") if text else type(cause).__name__
    mode = os.environ.get(AUTH_MODE_ENV, "unset")
    if mode.lower() != "token":
        driver = f"this driver sends no token, as {AUTH_MODE_ENV} is {mode}"
    elif os.environ.get(TOKEN_ENV) or os.environ.get(TOKEN_PATH_ENV) or default_token_path().exists():
        driver = "it refused this driver's token"
    else:
        driver = "this driver has no token"
    return (
        f"the Ray cluster at {address} requires token authentication and {driver} (Ray says: {reason}). "
        f"To join it, {TOKEN_HELP}"
    )


def _auth_error_in(exc: BaseException | None) -> BaseException | None:
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:  # Ray < 2.52
        return None
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, AuthenticationError) or "InvalidAuthToken" in str(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
