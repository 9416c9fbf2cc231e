"""`GET …/sources` and `GET …/transcript` against turns the worker really ran on the sandbox.

The sandbox's citations are deterministic: one URL per (field, question, earlier questions), so
two turns asking the same question on the same context cite the same page, as real follow-ups
re-reading a source do.
"""

from __future__ import annotations

import json
import re
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.token import Token

from tests.helpers import assert_problem, create_conversation, new_key, post_turn, wait_turn

QUESTION_1 = "Which country won the most Winter Olympics gold medals in 2026?"
QUESTION_2 = "How many medals did they win?"


async def completed(api, conversation_id: str, question: Any, **body: Any) -> dict[str, Any]:
    turn = await wait_turn(api, await post_turn(api, conversation_id, question, **body))
    assert turn["status"] == "completed", turn
    return turn


def citations_by_hand(turns: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(url, turn id) of every citation, walking each turn's basis as a client would."""
    return [(c["url"], t["id"]) for t in turns for field in t["basis"] for c in field["citations"]]


async def three_turns(api) -> tuple[str, list[dict[str, Any]]]:
    """Turn 1, then turn 2 and a branch (turn 3) asking the same follow-up of turn 1."""
    conversation = await create_conversation(api, title="Winter Olympics 2026")
    first = await completed(api, conversation["id"], QUESTION_1)
    second = await completed(api, conversation["id"], QUESTION_2)
    branch = await completed(api, conversation["id"], QUESTION_2, parent_turn_id=first["id"])
    return conversation["id"], [first, second, branch]


async def test_sources_list_each_url_once_with_every_turn_that_cited_it(api, worker):
    conversation_id, (first, second, branch) = await three_turns(api)
    cited = citations_by_hand([first, second, branch])
    assert len(cited) == 3 and cited[1][0] == cited[2][0]  # the same question, the same page

    response = await api.get(f"/v1/conversations/{conversation_id}/sources")

    assert response.status_code == 200, response.text
    sources = response.json()["data"]
    assert [s["url"] for s in sources] == [cited[0][0], cited[1][0]]
    assert [(s["first_turn_id"], s["turn_ids"]) for s in sources] == [
        (first["id"], [first["id"]]), (second["id"], [second["id"], branch["id"]])]
    page = second["basis"][0]["citations"][0]
    assert sources[1]["title"] == page["title"]
    # Both turns quoted the same excerpt: it is listed once.
    assert page["excerpts"] == branch["basis"][0]["citations"][0]["excerpts"]
    assert sources[1]["excerpts"] == page["excerpts"] and len(page["excerpts"]) == 1


async def test_sources_follow_the_basis_order_and_skip_turns_that_did_not_complete(api, worker):
    conversation = await create_conversation(api)
    path = f"/v1/conversations/{conversation['id']}"
    assert (await api.get(f"{path}/sources")).json() == {"data": []}
    schema = {"type": "json", "json_schema": {"type": "object", "properties": {
        "winner": {"type": "string"}, "golds": {"type": "integer"}, "host": {"type": "string"}}}}
    structured = await completed(api, conversation["id"], "The 2026 winner", output_schema=schema)
    failed = await wait_turn(api, await post_turn(api, conversation["id"], "Lost [sandbox:fail]"))
    assert failed["status"] == "failed"
    text = await completed(api, conversation["id"], QUESTION_2)

    sources = (await api.get(f"{path}/sources")).json()["data"]

    assert len(structured["basis"]) == 3  # a field each, each citing its own page
    cited = citations_by_hand([structured, text])
    assert len({url for url, _ in cited}) == 4 and cited != sorted(cited)
    assert [(s["url"], s["turn_ids"]) for s in sources] == [(u, [t]) for u, t in cited]


async def test_a_branch_transcript_holds_its_own_lineage_only(api, worker):
    conversation_id, (first, second, branch) = await three_turns(api)
    path = f"/v1/conversations/{conversation_id}/transcript"

    newest = await api.get(path)  # the newest completed turn: the branch
    of_second = await api.get(path, params={"turn_id": second["id"]})

    assert newest.status_code == of_second.status_code == 200, newest.text + of_second.text
    assert newest.headers["content-type"].startswith("application/json")
    assert newest.headers["vary"] == "Accept"
    assert newest.json() == {"conversation_id": conversation_id, "turn_id": branch["id"],
                             "turns": [transcript_turn(first), transcript_turn(branch)]}
    assert of_second.json() == {"conversation_id": conversation_id, "turn_id": second["id"],
                                "turns": [transcript_turn(first), transcript_turn(second)]}


def transcript_turn(turn: dict[str, Any]) -> dict[str, Any]:
    """What a transcript shows of a turn, built from the turn as GET …/turns/{id} answers it."""
    titles: dict[str, str | None] = {}
    for field in turn["basis"]:
        for citation in field["citations"]:
            titles[citation["url"]] = titles.get(citation["url"]) or citation["title"]
    return {"id": turn["id"], "seq": turn["seq"], "input": turn["input"],
            "output": turn["output"],
            "citations": [{"n": n, "url": url, "title": title}
                          for n, (url, title) in enumerate(titles.items(), 1)]}


async def test_a_transcript_skips_failed_turns_and_ends_only_at_a_completed_one(api, worker):
    conversation = await create_conversation(api)
    path = f"/v1/conversations/{conversation['id']}/transcript"
    empty = await api.get(path)
    assert empty.status_code == 200
    assert empty.json() == {"conversation_id": conversation["id"], "turn_id": None, "turns": []}
    first = await completed(api, conversation["id"], QUESTION_1)
    failed = await wait_turn(api, await post_turn(api, conversation["id"], "Lost [sandbox:fail]"))
    third = await completed(api, conversation["id"], QUESTION_2)  # a child of the failed turn
    assert third["parent_turn_id"] == failed["id"]

    lineage = (await api.get(path, params={"turn_id": third["id"]})).json()
    assert [t["id"] for t in lineage["turns"]] == [first["id"], third["id"]]

    refused = assert_problem(await api.get(path, params={"turn_id": failed["id"]}), 409)
    assert "failed" in refused["detail"]
    assert_problem(await api.get(path, params={"turn_id": "turn_000000000000000000000000"}), 404)
    other = await create_conversation(api)
    assert_problem(await api.get(f"/v1/conversations/{other['id']}/transcript",
                                 params={"turn_id": first["id"]}), 404)


async def test_another_tenants_conversation_and_turns_are_not_found(api, client, resources,
                                                                     worker):
    conversation_id, (first, _, _) = await three_turns(api)
    theirs = {"Authorization": f"Bearer {await new_key(resources, 'globex')}"}
    for route in ("sources", "transcript"):
        assert_problem(await client.get(f"/v1/conversations/{conversation_id}/{route}",
                                        headers=theirs), 404)
    own = (await client.post("/v1/conversations", json={}, headers=theirs)).json()
    # Their own conversation with our turn's id: not found either.
    assert_problem(await client.get(f"/v1/conversations/{own['id']}/transcript",
                                    params={"turn_id": first["id"]}, headers=theirs), 404)
    assert (await client.get(f"/v1/conversations/{own['id']}/sources",
                             headers=theirs)).json() == {"data": []}


# --- markdown --------------------------------------------------------------------------------

async def test_the_markdown_transcript_reads_back_with_a_commonmark_parser(api, worker):
    conversation = await create_conversation(api, title="Medals *and* [links] <b>")
    # Its answer (which quotes the question) leaves a code fence open; the title the sandbox
    # gives its source holds link syntax.
    tricky = "Show [the table](x) *now*:\n```python\nprint(1)"
    first = await completed(api, conversation["id"], tricky)
    schema = {"type": "json", "json_schema": {"type": "object", "properties": {
        "winner": {"type": "string"}, "golds": {"type": "integer"}}}}
    second = await completed(api, conversation["id"], {"topic": "medals", "year": 2026},
                             output_schema=schema)
    third = await completed(api, conversation["id"], QUESTION_2)

    response = await api.get(f"/v1/conversations/{conversation['id']}/transcript",
                             headers={"Accept": "text/markdown"})

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/markdown; charset=utf-8"
    document = read_markdown(response.text)
    assert document["title"] == "Medals *and* [links] <b>"
    assert [s["heading"] for s in document["turns"]] == ["Turn 1", "Turn 2", "Turn 3"]
    one, two, three = document["turns"]
    # The first answer quotes the open fence, and so does the third (it lists the earlier
    # questions): each is closed after the answer, which is otherwise as Parallel wrote it.
    assert one["question"] == tricky
    assert one["answer"] == first["output"]["content"] + "\n```"
    assert two["question_json"] == second["input"]
    assert two["answer_json"] == second["output"]["content"]
    assert three["question"] == QUESTION_2
    assert three["answer"] == third["output"]["content"] + "\n```"
    for section, turn in zip(document["turns"], (first, second, third), strict=True):
        expected = transcript_turn(turn)["citations"]
        # Titles on one line: their whitespace runs become one space.
        assert section["citations"] == [(" ".join(c["title"].split()), c["url"])
                                        for c in expected]
    assert len(two["citations"]) == 2  # one per field of the JSON answer


async def test_the_accept_header_chooses_json_or_markdown_and_refuses_neither(api, worker):
    conversation = await create_conversation(api)
    await completed(api, conversation["id"], QUESTION_1)
    path = f"/v1/conversations/{conversation['id']}/transcript"
    for accept, kind in [
        (None, "application/json"), ("*/*", "application/json"),
        ("text/markdown", "text/markdown"), ("text/*", "text/markdown"),
        ("text/html,application/xhtml+xml,*/*;q=0.8", "application/json"),  # a browser
        ("text/markdown;q=0.5, application/json", "application/json"),
        ("application/json;q=0, */*", "text/markdown"),
        ("text/markdown; charset=utf-8", "text/markdown"),
    ]:
        response = await api.get(path, headers={"Accept": accept} if accept else {})
        assert response.status_code == 200, (accept, response.text)
        assert response.headers["content-type"].startswith(kind), accept
    for accept in ("text/html", "application/xml", "text/markdown;q=0", "image/*"):
        refused = assert_problem(await api.get(path, headers={"Accept": accept}), 406)
        assert "text/markdown" in refused["detail"]
    empty = await create_conversation(api)
    markdown = await api.get(f"/v1/conversations/{empty['id']}/transcript",
                             headers={"Accept": "text/markdown"})
    assert markdown.status_code == 200 and "no completed turn yet" in markdown.text


def read_markdown(text: str) -> dict[str, Any]:
    """The document as a CommonMark parser reads it: its title, then per `## ` section its
    heading, question, answer (each the source of its blocks, blockquote markers dropped, or
    the value of a lone `json` fence) and citations, as (link text, href)."""
    lines = text.split("\n")
    tokens = MarkdownIt("commonmark").parse(text)
    document: dict[str, Any] = {"turns": []}
    section: dict[str, Any] = {}
    part = ""
    for at, token in enumerate(tokens):
        if token.level != 0 or not token.map or token.type.endswith("_close"):
            continue
        if token.type == "heading_open":
            if token.tag == "h1":
                document["title"] = plain(tokens[at + 1])
            else:
                section = {"heading": tokens[at + 1].content, "citations": []}
                document["turns"].append(section)
            part = ""
        elif token.type == "paragraph_open" and tokens[at + 1].content in (
                "**Question**", "**Answer**", "**Citations**"):
            part = tokens[at + 1].content.strip("*").lower()
        elif part == "citations" and token.type == "ordered_list_open":
            section["citations"] = [
                (plain(inline), str(next(c for c in inline.children or []
                                         if c.type == "link_open").attrs["href"]))
                for inline in tokens[at:] if inline.type == "inline"
                and inline.map and inline.map[0] < token.map[1]]
        elif part in ("question", "answer"):
            if token.type == "fence" and token.info == "json":
                section[f"{part}_json"] = json.loads(token.content)
            source = [re.sub(r"^> ?", "", line) if token.type == "blockquote_open" else line
                      for line in lines[token.map[0]:token.map[1]]]
            section[part] = "\n".join(filter(None, [section.get(part), *source])).strip()
    return document


def plain(inline: Token) -> str:
    """An inline token's text as a reader sees it (escapes resolved, markup dropped)."""
    return "".join(child.content for child in inline.children or []
                   if child.type in ("text", "code_inline", "html_inline"))
