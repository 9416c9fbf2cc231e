"""How a reseeded input is built: newest exchanges first within the limit, a cut newest one when
none fits whole, object inputs gaining a field."""

from __future__ import annotations

from service.clients.parallel import MAX_REQUEST_CHARS, request_chars
from service.domain.reseed import CUT, exchange, seeded_input

TEXT = {"type": "text"}


def within(limit: int):
    return lambda candidate: request_chars(candidate, TEXT) <= limit


def test_every_exchange_that_fits_is_kept_oldest_first():
    exchanges = [exchange("Who won?", {"type": "text", "content": "Norway."}),
                 exchange({"country": "Norway"}, {"type": "json", "content": {"golds": 18}})]
    seeded = seeded_input("And silver?", exchanges, within(MAX_REQUEST_CHARS))
    assert seeded == (
        "Earlier in this conversation (oldest first):\n\n"
        "Question: Who won?\nAnswer: Norway.\n\n"
        'Question: {"country":"Norway"}\nAnswer: {"golds":18}\n\n'
        "Now answer this follow-up question:\nAnd silver?"
    )


def test_the_newest_are_kept_and_the_result_fits_exactly_at_the_limit():
    exchanges = [exchange(f"q{n} " + "x" * 1000, {"content": f"a{n}"}) for n in range(10)]
    seeded = seeded_input("now?", exchanges, within(MAX_REQUEST_CHARS))
    kept = [n for n in range(10) if f"Question: q{n} " in seeded]
    assert kept == list(range(10))
    small = 3500
    seeded = seeded_input("now?", exchanges, within(small))
    assert isinstance(seeded, str) and request_chars(seeded, TEXT) <= small
    kept = [n for n in range(10) if f"Question: q{n} " in seeded]
    assert kept == [7, 8, 9]
    assert "older turns left out" in seeded


def test_a_newest_exchange_too_long_alone_is_cut_to_fit():
    exchanges = [exchange("old", {"content": "a"}), exchange("new " + "y" * 5000, {"content": "b"})]
    limit = 2000
    seeded = seeded_input("now?", exchanges, within(limit))
    assert isinstance(seeded, str)
    assert limit - 5 <= request_chars(seeded, TEXT) <= limit  # as much of it as fits
    assert "Question: new yyy" in seeded and CUT in seeded and "Question: old" not in seeded
    assert seeded.endswith("now?")


def test_no_room_at_all_leaves_the_question_alone():
    question = "z" * (MAX_REQUEST_CHARS - 40)
    exchanges = [exchange("old", {"content": "a"})]
    assert seeded_input(question, exchanges, within(MAX_REQUEST_CHARS)) == question
    assert seeded_input("q", [], within(MAX_REQUEST_CHARS)) == "q"


def test_an_object_input_gains_a_context_field_first():
    exchanges = [exchange("Who won?", {"content": "Norway."})]
    seeded = seeded_input({"country": "Norway", "conversation_context": "mine"}, exchanges,
                          within(MAX_REQUEST_CHARS))
    assert isinstance(seeded, dict)
    assert list(seeded) == ["conversation_context_2", "country", "conversation_context"]
    assert seeded["conversation_context"] == "mine"
    assert seeded["conversation_context_2"] == (
        "Earlier in this conversation (oldest first):\n\nQuestion: Who won?\nAnswer: Norway.")
