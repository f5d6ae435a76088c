"""Web sessions: a browser logs in once with an API key and then carries a cookie.

The cookie is 256 random bits; the store keeps only its SHA-256, beside the hash of the
key it logged in with (so revoking the key ends the session, within the key cache's
few seconds) and a CSRF token the session's forms and scripts must send back.

>>> # sessions = Sessions(store, keyring, lifetime=7 * 86400)
>>> # token, session, key = await sessions.login("obb_client_...")
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from openbeepboop.server.core.auth import KeyRing
from openbeepboop.server.core.keys import hash_key
from openbeepboop.server.errors import AuthenticationFailed
from openbeepboop.server.models import ApiKey, WebSession
from openbeepboop.server.store.base import Store

CACHE_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Login:
    """A new session: the cookie to set (shown once), its record, the key behind it."""

    token: str
    session: WebSession
    key: ApiKey


def session_hash(token: str) -> str:
    """The hex SHA-256 the store keeps instead of the cookie."""
    return hashlib.sha256(token.encode()).hexdigest()


def same_token(given: str | None, expected: str) -> bool:
    """A constant-time comparison of a CSRF token."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class Sessions:
    """Logs browsers in and out, and finds the key and session behind a cookie. A
    logout takes effect at once on this server and within `CACHE_SECONDS` on others."""

    def __init__(
        self,
        store: Store,
        keyring: KeyRing,
        lifetime: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._lifetime = lifetime
        self._clock = clock
        self._cache: dict[str, tuple[WebSession | None, float]] = {}

    async def login(self, secret: str) -> Login:
        """A session for the active key `secret`, or AuthenticationFailed."""
        key = await self._keyring.authenticate(secret.strip())
        now = self._clock()
        await self._store.prune_sessions(now)
        token = secrets.token_urlsafe(32)
        session = WebSession(
            id_hash=session_hash(token),
            key_hash=hash_key(secret.strip()),
            csrf=secrets.token_urlsafe(32),
            created_at=now,
            expires_at=now + self._lifetime,
        )
        await self._store.create_session(session)
        return Login(token=token, session=session, key=key)

    async def resolve(self, token: str | None) -> tuple[ApiKey, WebSession]:
        """The active key and live session behind a cookie, or AuthenticationFailed."""
        if not token:
            raise AuthenticationFailed("not logged in", code="missing_api_key")
        digest = session_hash(token)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[1] < CACHE_SECONDS:
            session = cached[0]
        else:
            session = await self._store.get_session(digest, now)
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (session, now)
        if session is None or session.expires_at <= now:
            raise AuthenticationFailed("the session expired or was logged out; log in again")
        return await self._keyring.authenticate_hash(session.key_hash), session

    async def logout(self, token: str) -> None:
        """End the session behind a cookie (nothing if there is none)."""
        digest = session_hash(token)
        self._cache.pop(digest, None)
        await self._store.delete_session(digest)
