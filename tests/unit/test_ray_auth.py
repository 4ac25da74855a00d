"""auditor.pipeline.ray_auth without a Ray: the local audit's token (on, private) and the one-line refusal."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from auditor.pipeline import ray_auth


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty HOME and no RAY_AUTH_*; this process's Ray config is left alone (the integration tests and the
    local audits of tests/integration check what Ray then does)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(ray_auth, "refresh_ray_config", lambda: None)
    for key in (ray_auth.AUTH_MODE_ENV, ray_auth.TOKEN_ENV, ray_auth.TOKEN_PATH_ENV):
        monkeypatch.setenv(key, "")  # recorded, so what secure_local_ray sets is undone after the test
        monkeypatch.delenv(key)
    return tmp_path


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_installed_ray_has_token_auth():
    assert ray_auth.has_token_auth()  # the tested Ray (2.60); 2.50-2.51 would not


def test_a_local_ray_gets_token_auth_and_a_token_only_its_user_reads(home):
    ray_auth.secure_local_ray()
    token = home / ".ray" / "auth_token"
    assert os.environ[ray_auth.AUTH_MODE_ENV] == "token"
    assert mode(token) == 0o600 and mode(token.parent) == 0o700
    assert len(token.read_text()) == 64 and int(token.read_text(), 16) >= 0
    before = token.read_text()
    ray_auth.secure_local_ray()  # a second audit keeps the token
    assert token.read_text() == before


def test_a_token_file_others_can_read_is_tightened(home, caplog):
    token = home / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("f" * 64)
    token.chmod(0o644)  # what Ray 2.60 writes under the usual umask 022
    with caplog.at_level(logging.WARNING):
        ray_auth.secure_local_ray()
    assert mode(token) == 0o600 and token.read_text() == "f" * 64
    assert "was readable by other users (mode 644); made it 0600" in caplog.text


@pytest.mark.parametrize(
    ("env", "auth_mode"),
    [({"RAY_AUTH_MODE": "disabled"}, "disabled"), ({"RAY_AUTH_TOKEN": "abc"}, "token")],
    ids=["user-disabled-it", "token-in-env"],
)
def test_the_users_choice_is_kept_and_no_file_written(home, monkeypatch, env, auth_mode):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ray_auth.secure_local_ray()
    assert os.environ[ray_auth.AUTH_MODE_ENV] == auth_mode
    assert not (home / ".ray").exists()


def test_a_ray_without_token_auth_warns(home, monkeypatch, caplog):
    monkeypatch.setattr(ray_auth, "has_token_auth", lambda: False)
    with caplog.at_level(logging.WARNING):
        ray_auth.secure_local_ray()
    assert ray_auth.AUTH_MODE_ENV not in os.environ and not (home / ".ray").exists()
    assert "has no token authentication (Ray >= 2.52 has it)" in caplog.text


def test_a_refusal_is_one_line_that_says_what_to_set(home, monkeypatch):
    from ray.exceptions import AuthenticationError

    exc = AuthenticationError("Token authentication is enabled but no authentication token was found")
    assert ray_auth.is_auth_refusal(exc) and not ray_auth.is_auth_refusal(ConnectionError("timed out"))
    message = ray_auth.refusal_message("10.0.0.1:6379", ConnectionError("Failed to connect"))
    assert "\n" not in message
    assert message.startswith(
        "the Ray cluster at 10.0.0.1:6379 requires token authentication and this driver sends no token, as "
        "RAY_AUTH_MODE is unset (Ray says: Failed to connect). To join it, set RAY_AUTH_MODE=token and "
    )
    assert "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token>" in message
    monkeypatch.setenv(ray_auth.AUTH_MODE_ENV, "token")
    assert (
        "and this driver has no token (Ray says: Token authentication is enabled but no authentication token "
        "was found)" in ray_auth.refusal_message("h:1", exc)
    )
    monkeypatch.setenv(ray_auth.TOKEN_ENV, "wrong-token-5e1f")
    wrapped = ConnectionError("Failed to connect to Ray cluster at h:1")
    wrapped.__cause__ = RuntimeError(
        "Failed to connect to GCS. ...\nRPC error: InvalidAuthToken: missing or incorrect. See"
    )
    assert ray_auth.is_auth_refusal(wrapped)
    message = ray_auth.refusal_message("h:1", wrapped)
    assert (
        "and it refused this driver's token (Ray says: RPC error: InvalidAuthToken: missing or incorrect)"
        in message
    )
    assert "wrong-token-5e1f" not in message


def test_an_address_that_does_not_answer_is_left_to_ray_init():
    """No GCS client (40 s of waiting) when nothing listens: ray.init reports an unreachable cluster as before."""
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    for address in (f"127.0.0.1:{port}", "ray://127.0.0.1:10001", "auto"):
        ray_auth.check_token(address)
    assert time.monotonic() - started < 10


def test_a_home_that_cannot_hold_the_token_gets_a_token_for_this_run(home, caplog):
    (home / ".ray").write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING):
        ray_auth.secure_local_ray()
    assert os.environ[ray_auth.AUTH_MODE_ENV] == "token" and len(os.environ[ray_auth.TOKEN_ENV]) == 64
    assert "cannot write a token file" in caplog.text and os.environ[ray_auth.TOKEN_ENV] not in caplog.text
