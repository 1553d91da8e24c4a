"""SageMaker's stateful sessions: the session store on its directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmi_core.errors import SessionError
from lmi_core.http.sessions import EXPIRY_FILE, SessionStore


def test_a_session_lives_until_it_expires_and_is_then_removed(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "sessions", expiration=10)
    session_id, expires = store.create(now=100.0)
    assert expires == 110.0 and (tmp_path / "sessions" / session_id / EXPIRY_FILE).is_file()
    store.check(session_id, now=105.0)
    # Another store on the same directory (another model, or the server restarted) sees it too.
    SessionStore(tmp_path / "sessions", expiration=1).check(session_id, now=105.0)
    with pytest.raises(SessionError, match="expired") as info:
        store.check(session_id, now=111.0)
    assert info.value.status == 424 and not (tmp_path / "sessions" / session_id).exists()
    with pytest.raises(SessionError, match="unknown"):
        store.check(session_id, now=111.0)


def test_new_sessions_sweep_expired_ones(tmp_path: Path) -> None:
    store = SessionStore(tmp_path, expiration=10)
    old, _ = store.create(now=0.0)
    live, _ = store.create(now=5.0)
    store.create(now=12.0)
    assert not (tmp_path / old).exists() and (tmp_path / live).exists()


@pytest.mark.parametrize("session_id", ["../x", "s1", "", "0" * 36])
def test_only_a_uuid_names_a_session(tmp_path: Path, session_id: str) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / EXPIRY_FILE).write_text("1e12")
    with pytest.raises(SessionError, match="unknown"):
        SessionStore(tmp_path / "sessions", 10).check(session_id, now=0.0)
