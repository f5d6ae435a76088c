"""The Keys page (admin keys only): list the keys, create one (its secret shown once, in
the answer to the form, never stored), revoke one after a confirmation step, with a
clear warning when it is the key of the admin's own session."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.responses import RedirectResponse, Response

from openbeepboop.server.core.keys import IssuedKey
from openbeepboop.server.http.guards import SESSION_COOKIE
from openbeepboop.server.http.state import app_state
from openbeepboop.server.models import ApiKey, Role
from openbeepboop.server.web.pages import (
    AdminViewer,
    Viewer,
    checked_form,
    page_router,
    render,
    secure_headers,
)

# the tag site.py looks for to answer errors as pages (FastAPI 0.165 hands the handler
# the route as declared here, without the tags include_router added)
router = page_router()
MAX_NAME = 256  # as the API's NewKeyBody
ROLES = [Role.CLIENT, Role.ADMIN, Role.NODE]


async def _page(
    request: Request,
    seen: Viewer,
    *,
    issued: IssuedKey | None = None,
    confirm: str | None = None,
    revoked: str | None = None,
    error: str = "",
    form: dict[str, str] | None = None,
    status_code: int = 200,
) -> Response:
    """The page: the keys (active first, newest first) and what just happened."""
    keys = await app_state(request).keyring.list_keys()
    keys.sort(key=lambda k: (not k.active, -k.created_at))
    by_id = {k.id: k for k in keys}
    to_confirm = by_id.get(confirm) if confirm else None
    if confirm and (to_confirm is None or not to_confirm.active):
        error = error or f"There is no active key with id {confirm!r}."
        to_confirm = None
    context: dict[str, Any] = {
        "title": "Keys",
        "keys": keys,
        "roles": [r.value for r in ROLES],
        "issued": issued,
        "confirm": to_confirm,
        "revoked": by_id.get(revoked) if revoked else None,
        "error": error,
        "form": form or {"role": Role.CLIENT.value, "name": ""},
        "active": sum(k.active for k in keys),
    }
    return render(request, "keys.html", context, seen, status_code)


@router.get("/keys")
async def keys_page(
    request: Request, seen: AdminViewer, revoke: str | None = None, revoked: str | None = None
) -> Response:
    """The list; `?revoke=ID` asks to confirm revoking that key, `?revoked=ID` says it was."""
    return await _page(request, seen, confirm=revoke, revoked=revoked)


def _new_key_input(role: object, name: object) -> tuple[Role | None, str, str]:
    """(role, name, error) of the create form; error is '' when both are fine."""
    given = name.strip() if isinstance(name, str) else ""
    if role not in [r.value for r in ROLES]:
        return None, given, "Pick a role: client, admin or node."
    if len(given) > MAX_NAME:
        return None, given, f"The name is {len(given)} characters long; at most {MAX_NAME}."
    return Role(role), given, ""


@router.post("/keys")
async def create_key(request: Request, seen: AdminViewer) -> Response:
    """Create a key and show its secret, this once (the store keeps only its hash)."""
    form = await checked_form(request, seen)
    role, name, error = _new_key_input(form.get("role"), form.get("name"))
    if role is None:
        kept = {"role": str(form.get("role") or ""), "name": name}
        return await _page(request, seen, error=error, form=kept, status_code=400)
    issued = await app_state(request).keyring.create(role, name)
    return await _page(request, seen, issued=issued)


@router.post("/keys/{key_id}/revoke")
async def revoke_key(request: Request, key_id: str, seen: AdminViewer) -> Response:
    """Revoke a key once confirmed: `confirm=yes`, or `confirm=own` for the key of this
    very session (which then ends: the browser goes to the login page)."""
    form = await checked_form(request, seen)
    own = key_id == seen.key.id
    if form.get("confirm") != ("own" if own else "yes"):
        return await _page(request, seen, confirm=key_id)  # ask (again), plainly
    state = app_state(request)
    key: ApiKey = await state.keyring.revoke(key_id)
    if not own:
        return secure_headers(RedirectResponse(f"/keys?revoked={key.id}", status_code=303))
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        await state.sessions.logout(token)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return secure_headers(response)
