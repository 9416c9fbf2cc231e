"""The webhook ledger pages like every list: `limit` rows, then `next_cursor` until the last
page, each delivery once, in event order (service.domain.cursors.page_of)."""

from __future__ import annotations

import pytest

from tests.helpers import create_conversation, post_turn, wait_turn
from tests.receivers import Receiver, serve


@pytest.fixture
async def receiver_url():
    async with serve(Receiver()) as url:
        yield f"{url}/hooks/research"


async def test_the_ledger_pages_through_every_delivery_once(api, worker, receiver_url):
    conversation = await create_conversation(api, webhook_url=receiver_url)
    path = f"/v1/conversations/{conversation['id']}/webhook-deliveries"
    for question in ("One?", "Two?", "Three?"):
        assert (await wait_turn(api, await post_turn(api, conversation["id"], question)))[
            "status"] == "completed"

    whole = (await api.get(path, params={"limit": 3})).json()
    assert len(whole["data"]) == 3 and whole["next_cursor"] is None

    first = (await api.get(path, params={"limit": 2})).json()
    assert len(first["data"]) == 2 and first["next_cursor"]
    rest = (await api.get(path, params={"limit": 2, "cursor": first["next_cursor"]})).json()
    assert len(rest["data"]) == 1 and rest["next_cursor"] is None
    paged = [d["event_sequence"] for d in first["data"] + rest["data"]]
    assert paged == [d["event_sequence"] for d in whole["data"]] == sorted(paged)
