"""The fast lane reads what each route it serves declares, and refuses routes it would
call wrongly (the app must not start then). Its answers equal FastAPI's: every in-process
HTTP test runs with the lane on and off (conftest's `fast_lane`), and
test_bad_input.py compares both paths on random bodies."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from fastapi import APIRouter, Depends, Header, Request
from starlette.responses import Response

from openbeepboop.server.http import routes_client, routes_node
from openbeepboop.server.http.fastlane import SERVED, LaneMismatch, lanes
from openbeepboop.server.http.guards import admin_key, client_key, node_key
from openbeepboop.server.http.inbound import ChatCompletionBody, FetchBody
from openbeepboop.server.models import ApiKey, Role

ClientKey = Annotated[ApiKey, Depends(client_key)]


def test_every_served_route_gets_a_lane_with_its_own_body_model_and_guard() -> None:
    found = lanes([routes_client.router, routes_node.router])
    assert sorted(found) == sorted(SERVED)
    chat = found["/v1/chat/completions"]
    assert chat.parse == ChatCompletionBody.model_validate
    assert (chat.role, chat.body_name, chat.key_name) == (Role.CLIENT, "body", "key")
    assert chat.headers == {"prefer", "idempotency_key"}
    assert found["/internal/queue/fetch"].parse == FetchBody.model_validate
    assert found["/internal/queue/fetch"].role is Role.NODE
    assert found["/v1/jobs"].parse({"a": 1}) == {"a": 1}
    with pytest.raises(ValueError):
        found["/v1/jobs"].parse([1])


def _with_chat(endpoint: Any) -> list[APIRouter]:
    """The real routers, with the chat route replaced by `endpoint`."""
    router = APIRouter()
    router.post("/v1/chat/completions")(endpoint)
    others = APIRouter()
    for route in routes_client.router.routes:
        if getattr(route, "path", None) != "/v1/chat/completions":
            others.routes.append(route)
    return [router, others, routes_node.router]


async def _extra_query(request: Request, body: ChatCompletionBody, key: ClientKey, x: int) -> Any:
    return Response()


async def _extra_header(
    request: Request, body: ChatCompletionBody, key: ClientKey, x_trace: Annotated[str, Header()]
) -> Any:
    return Response()


async def _admin_guard(
    request: Request, body: ChatCompletionBody, key: Annotated[ApiKey, Depends(admin_key)]
) -> Any:
    return Response()


async def _second_dependency(
    request: Request,
    body: ChatCompletionBody,
    key: ClientKey,
    other: Annotated[ApiKey, Depends(node_key)],
) -> Any:
    return Response()


async def _no_body(request: Request, key: ClientKey) -> Any:
    return Response()


async def _untyped_body(request: Request, body: list[int], key: ClientKey) -> Any:
    return Response()


@pytest.mark.parametrize(
    ("endpoint", "says"),
    [
        (_extra_query, "declares parameters the fast lane does not supply"),
        (_extra_header, "declares parameters the fast lane does not supply"),
        (_admin_guard, "knows only the client and node key guards"),
        (_second_dependency, "one body and one key guard"),
        (_no_body, "one body and one key guard"),
        (_untyped_body, "cannot validate a body of type"),
    ],
)
def test_a_route_the_lane_would_call_wrongly_is_refused(endpoint: Any, says: str) -> None:
    with pytest.raises(LaneMismatch, match=says) as caught:
        lanes(_with_chat(endpoint))
    assert "POST /v1/chat/completions" in str(caught.value)


def test_a_served_route_that_is_missing_is_refused() -> None:
    with pytest.raises(LaneMismatch, match="exactly one POST /internal/queue/fetch"):
        lanes([routes_client.router])
