"""A turn's `context`, and the self-healing chain: when Parallel (the sandbox, its interaction
expired) refuses a create's previous_interaction_id, the run is created once more without it,
the lineage's earlier questions and answers in front, and the turn says `reseeded`."""

from __future__ import annotations

import json
import re

import httpx

from service.clients.parallel import MAX_REQUEST_CHARS
from tests.helpers import (
    TASK_GROUPS,
    create_conversation,
    parse,
    post_turn,
    sandbox_record,
    sandbox_runs,
    set_faults,
    value,
    wait_turn,
)

RESEEDED = "research_context_reseeded_total"


def expire(sandbox_url: str, interaction_id: str) -> None:
    httpx.post(f"{sandbox_url}/_sandbox/interactions/{interaction_id}/expire").raise_for_status()


async def reseeds(client: httpx.AsyncClient, outcome: str) -> float:
    return value(parse((await client.get("/metrics")).text), RESEEDED, outcome=outcome)


async def creates(sandbox_url: str) -> list[dict]:
    """The calls that create runs: single creates, and adds to a task group (group mode)."""
    calls = (await sandbox_record(sandbox_url, "calls"))["data"]
    return [c for c in calls if c["method"] == "POST" and (
        c["path"] == "/v1/tasks/runs" or re.fullmatch(r"/v1/tasks/groups/[^/]+/runs", c["path"]))]


async def events_of(api: httpx.AsyncClient, turn: dict) -> list[dict]:
    page = (await api.get(f"/v1/conversations/{turn['conversation_id']}/events")).json()
    return [e for e in page["data"] if e["turn_id"] == turn["id"]]


async def ask(api: httpx.AsyncClient, conversation_id: str, question: str, **body) -> dict:
    return await wait_turn(api, await post_turn(api, conversation_id, question, **body))


async def test_a_first_turn_has_no_context_and_a_follow_up_is_chained(api, worker, sandbox):
    conversation = await create_conversation(api)
    queued = await post_turn(api, conversation["id"], "Which country won the most golds?")
    assert queued["context"] is None  # no run yet
    first = await wait_turn(api, queued)
    second = await ask(api, conversation["id"], "How many medals did they win?")

    assert (first["context"], second["context"]) == ("none", "chained")
    assert second["previous_interaction_id"] == first["interaction_id"]
    assert [e["data"]["context"] for e in await events_of(api, second)] == [
        None, "chained", "chained"]  # queued, running, completed


async def test_an_expired_interaction_is_reseeded_with_the_earlier_questions(
    api, client, worker, sandbox, receiver
):
    conversation = await create_conversation(api, webhook_url=receiver.url)
    first = await ask(api, conversation["id"], "Which country won the most golds in 2026?")
    second = await ask(api, conversation["id"], "How many medals did they win?")
    expire(sandbox.url, second["interaction_id"])
    created_before = await reseeds(client, "created")
    calls_before = len(await creates(sandbox.url))

    third = await ask(api, conversation["id"], "How does that compare to second place?")

    assert third["status"] == "completed", third
    assert third["context"] == "reseeded"
    assert third["previous_interaction_id"] is None
    [run] = sandbox_runs(sandbox.url, third["id"])  # one run for the turn, made unchained
    assert run["previous_interaction_id"] is None
    sent = run["input"]
    for earlier in (first, second):
        assert f"Question: {earlier['input']}\nAnswer: {earlier['output']['content']}" in sent
    assert sent.index(first["input"]) < sent.index(second["input"])  # oldest first
    assert sent.endswith(third["input"])
    # The chained create was refused (422; in group mode the group's add, then the single
    # create it is tried as), then the unchained one made the run.
    *refused, made = [c["status"] for c in (await creates(sandbox.url))[calls_before:]]
    assert refused == [422] * (2 if TASK_GROUPS else 1) and made in (200, 202)  # add: 200
    assert await reseeds(client, "created") == created_before + 1
    assert [e["data"]["context"] for e in await events_of(api, third)] == [
        None, "reseeded", "reseeded"]
    webhooks = [json.loads(r.body) for r in await receiver.wait_for(3)]
    assert webhooks[-1]["data"]["data"]["id"] == third["id"]
    assert webhooks[-1]["data"]["data"]["context"] == "reseeded"

    # The reseeded run's own interaction carries the context on: the next turn chains to it.
    fourth = await ask(api, conversation["id"], "And in 2022?")
    assert fourth["context"] == "chained"
    assert fourth["previous_interaction_id"] == third["interaction_id"]
    assert second["input"] in fourth["output"]["content"]  # via the reseeded run's input


async def test_the_expire_marker_reseeds_the_next_turn(api, worker, sandbox):
    conversation = await create_conversation(api)
    first = await ask(api, conversation["id"], "[sandbox:expire] Who won the most golds?")
    second = await ask(api, conversation["id"], "How many?")
    assert (second["status"], second["context"]) == ("completed", "reseeded")
    [run] = sandbox_runs(sandbox.url, second["id"])
    assert first["input"] in run["input"]


async def test_a_long_lineage_is_trimmed_to_the_newest_exchanges_that_fit(api, worker, sandbox):
    conversation = await create_conversation(api)
    # The sandbox's answers quote every earlier question, so exchanges grow: about 6k, 9k, 12k
    # and 15k characters. With the 3k question, only the newest (15k) fits in 25,000.
    questions = [f"Question {n}: " + chr(ord("a") + n) * 3000 for n in range(5)]
    done = [await ask(api, conversation["id"], q) for q in questions[:4]]
    expire(sandbox.url, done[-1]["interaction_id"])

    last = await ask(api, conversation["id"], questions[4])

    assert (last["status"], last["context"]) == ("completed", "reseeded")
    [run] = sandbox_runs(sandbox.url, last["id"])
    sent = run["input"]
    spec = json.dumps(run["task_spec"], separators=(",", ":"))
    assert len(sent) + len(spec) <= MAX_REQUEST_CHARS
    assert f"Question: {questions[3]}\nAnswer: {done[3]['output']['content']}" in sent
    for older in questions[:3]:
        assert f"Question: {older}" not in sent
    assert "older turns left out" in sent
    assert sent.endswith(questions[4])


async def test_a_refusal_that_persists_without_the_chain_fails_the_turn(
    api, client, worker, sandbox
):
    conversation = await create_conversation(api)
    await ask(api, conversation["id"], "Which country won the most golds?")
    refused_before = await reseeds(client, "refused")
    calls_before = len(await creates(sandbox.url))
    set_faults(sandbox.url, create_status=402)  # every create: Parallel wants payment

    failed = await ask(api, conversation["id"], "How many medals did they win?")

    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "parallel_payment_required"
    assert "402" in failed["error"]["message"]
    assert failed["context"] is None and failed["run_id"] is None
    assert [c["status"] for c in (await creates(sandbox.url))[calls_before:]] == [402, 402]
    assert await reseeds(client, "refused") == refused_before + 1
    assert sandbox_runs(sandbox.url, failed["id"]) == []


async def test_a_refused_first_turn_is_not_sent_again(api, worker, sandbox):
    conversation = await create_conversation(api)
    calls_before = len(await creates(sandbox.url))
    set_faults(sandbox.url, create_status=402)
    failed = await ask(api, conversation["id"], "Which country won the most golds?")
    assert failed["status"] == "failed"
    assert [c["status"] for c in (await creates(sandbox.url))[calls_before:]] == [402]
