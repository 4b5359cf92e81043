"""Speculative decoding behind the server: the same streamed and non-streamed text as without it, and the
spec_decode counters in /metrics."""

from __future__ import annotations

from typing import Any

import openai

from tests.server.conftest import MODEL_NAME, run_server, small_engine

NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}'
PROMPT = "one two three four five one two three four five one two three four five one two three"


def test_ngram_serving_matches_plain_and_reports_metrics(default_loaded: Any) -> None:
    texts = {}
    for name, extra in (("plain", {}), ("ngram", {"speculative_config": NGRAM})):
        with run_server(small_engine(default_loaded, **extra)) as live:
            client = openai.OpenAI(base_url=live.v1, api_key="unused")
            done = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0)
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0, stream=True))
            assert streamed == done.choices[0].text
            texts[name] = done.choices[0].text
            if name == "ngram":
                live.wait_idle()
                drafted = live.metric("tokenmill:spec_decode_num_draft_tokens_total")
                accepted = live.metric("tokenmill:spec_decode_num_accepted_tokens_total")
                assert drafted > 0 and 0 < accepted <= drafted
                assert live.metric("tokenmill:spec_decode_num_accepted_tokens_per_pos_total", 'position="0"') > 0
    assert texts["ngram"] == texts["plain"]
