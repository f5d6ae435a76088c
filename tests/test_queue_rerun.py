"""Queue.rerun, behind the job page's Re-run button: a new job with the same request,
owned by whoever asks (in-process; the browser test is in tests/test_web_jobs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from openbeepboop.server.core.queue import JobRequest
from openbeepboop.server.core.responses import RESPONSE_KEY
from openbeepboop.server.errors import NotFound
from openbeepboop.server.http.state import app_state
from tests.conftest import serve_in_process


async def test_rerun_copies_the_request_for_whoever_asks(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path) as api:
        state = app_state(api.app)
        admin, alice, bob = [
            await state.keyring.authenticate(s) for s in (api.admin, api.client, api.other_client)
        ]
        body = {"model": "m", "messages": [{"role": "user", "content": "again"}]}
        meta = {"tag": "x", RESPONSE_KEY: {"id": "resp_1"}}
        first = JobRequest("/v1/chat/completions", body, priority=3, metadata=meta)
        [made] = await state.queue.submit(alice, [first])
        copy = await state.queue.rerun(admin, made.job.id)
        assert copy.id != made.job.id and copy.owner == admin.id
        assert (copy.request, copy.endpoint, copy.priority) == (body, made.job.endpoint, 3)
        assert copy.metadata == {"tag": "x"}  # the Response's bookkeeping stays behind
        with pytest.raises(NotFound):
            await state.queue.rerun(bob, made.job.id)
