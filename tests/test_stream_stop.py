"""A streamed answer cut by a stop string: the token ids and logprobs streamed add up to the final result's, as
the text does, when the stop string spans several steps."""

from __future__ import annotations

import pytest
from conftest import random_prompts, tiny_loaded

from hasten.api import generate, stream


def streamed(loaded, prompt, method: str, stop: list[str]):
    events = list(stream(loaded, prompt, method, max_new_tokens=16, stop=stop, logprobs=True, top_logprobs=2))
    result = events[-1].result
    assert result is not None and all(event.result is None for event in events[:-1])
    return events, result


@pytest.mark.parametrize("method", ["ar", "pld"])
def test_streamed_ids_and_logprobs_equal_the_result_after_a_stop_string(method):
    loaded = tiny_loaded("llama", 6)
    answers = ((p, generate(loaded, p, "ar", max_new_tokens=16)) for p in random_prompts(20, seed=8))
    prompt, full = next((p, r) for p, r in answers if len(r.text.split()) >= 8)
    words = full.text.split()
    # Three words: with ar one token a step, so the stop string spans two step boundaries; its first words are
    # held back as text while they could still begin it.
    stop = " ".join(words[3:6])
    events, result = streamed(loaded, prompt, method, [stop])
    assert result.finish_reason == "stop" and stop not in result.text
    assert "".join(event.text for event in events) == result.text
    assert [t for event in events for t in event.token_ids] == result.token_ids
    assert [lp for event in events for lp in event.logprobs] == result.logprobs
    assert len(result.logprobs) == len(result.token_ids)
    assert result.token_ids == full.token_ids[: len(result.token_ids)] and len(result.token_ids) < len(full.token_ids)
    # Every event's ids are those of text already sent: none past what the text shows.
    sent_text, sent_ids = "", []
    for event in events[:-1]:
        sent_text += event.text
        sent_ids += event.token_ids
        assert sent_text.lstrip().startswith(loaded.tokenizer.decode(sent_ids, skip_special_tokens=True).lstrip())


def test_without_a_stop_string_every_id_streams_with_its_step():
    loaded = tiny_loaded("llama", 6)
    prompt = random_prompts(1, seed=6)[0]
    events, result = streamed(loaded, prompt, "pld", [])
    assert [t for event in events for t in event.token_ids] == result.token_ids
    assert [lp for event in events for lp in event.logprobs] == result.logprobs
    assert all(event.token_ids for event in events[:-1])  # nothing held back: each step's ids go out at once
