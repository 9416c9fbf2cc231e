"""The README's seed chain through the client openapi-python-client generates from the contract:
create a conversation, ask the three seed questions, wait for each turn to end, then read the
conversation's sources and its transcript.

`python seed_chain.py BASE_URL API_KEY` (tests/test_generated_client.py type-checks it with
`mypy --strict` beside the generated `research_client` package, then runs it against the app).
"""

from __future__ import annotations

import asyncio
import sys

from research_client import AuthenticatedClient
from research_client.api.conversations import create_conversation, get_transcript, list_sources
from research_client.api.turns import create_turn, get_turn
from research_client.models import (
    ConversationCreate,
    ConversationWithSecret,
    Problem,
    SourceList,
    TextOutput,
    Transcript,
    Turn,
    TurnCreate,
    TurnStatus,
)

SEED_QUESTIONS = (
    "Which country won the most Winter Olympics gold medals in 2026?",
    "How many medals did they win?",
    "How does that compare to the second place country?",
)
TERMINAL = {TurnStatus.COMPLETED, TurnStatus.FAILED, TurnStatus.CANCELLED}


async def wait_for(client: AuthenticatedClient, conversation_id: str, turn: Turn) -> Turn:
    for _ in range(20):  # each wait is at most 30 s
        if turn.status in TERMINAL:
            return turn
        answer = await get_turn.asyncio(conversation_id, turn.id, client=client, wait=30)
        if not isinstance(answer, Turn):
            raise SystemExit(f"GetTurn answered {answer!r}")
        turn = answer
    raise SystemExit(f"turn {turn.id} still {turn.status} after 10 minutes")


async def seed_chain(base_url: str, api_key: str) -> tuple[list[Turn], SourceList, Transcript]:
    async with AuthenticatedClient(base_url=base_url, token=api_key) as client:
        conversation = await create_conversation.asyncio(
            client=client, body=ConversationCreate(title="Winter Olympics"))
        if not isinstance(conversation, ConversationWithSecret):
            raise SystemExit(f"CreateConversation answered {conversation!r}")
        queued: list[Turn] = []
        for n, question in enumerate(SEED_QUESTIONS, 1):
            turn = await create_turn.asyncio(
                conversation.id, client=client, body=TurnCreate(input_=question),
                idempotency_key=f"{conversation.id}-question-{n}")
            if isinstance(turn, Problem) or turn is None:
                raise SystemExit(f"CreateTurn answered {turn!r}")
            queued.append(turn)
        done = [await wait_for(client, conversation.id, turn) for turn in queued]
        sources = await list_sources.asyncio(conversation.id, client=client)
        if not isinstance(sources, SourceList):
            raise SystemExit(f"ListSources answered {sources!r}")
        transcript = await get_transcript.asyncio(conversation.id, client=client)
        if not isinstance(transcript, Transcript):
            raise SystemExit(f"GetTranscript answered {transcript!r}")
        return done, sources, transcript


def main() -> None:
    turns, sources, transcript = asyncio.run(seed_chain(sys.argv[1], sys.argv[2]))
    for turn in turns:
        answer = turn.output.content if isinstance(turn.output, TextOutput) else turn.output
        print(f"{turn.seq} {turn.status.value} {turn.interaction_id} "
              f"{turn.previous_interaction_id} {answer!r}")
    print("sources", " ".join(",".join(source.turn_ids) for source in sources.data))
    print("transcript", transcript.turn_id, " ".join(t.id for t in transcript.turns))


if __name__ == "__main__":
    main()
