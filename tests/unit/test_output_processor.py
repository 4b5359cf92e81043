"""OutputProcessor with n > 1 in DELTA mode (streaming): each sample's final delta goes out exactly once, even when a
sibling is still running (found by the soak: a finished choice was re-sent with every later output)."""

from __future__ import annotations

from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.scheduler_output import EngineCoreOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams


def test_a_finished_sample_is_not_repeated_in_later_deltas(default_loaded) -> None:
    processor = OutputProcessor(default_loaded.tokenizer)
    params = SamplingParams(n=2, max_tokens=3, output_kind=RequestOutputKind.DELTA)
    first, second = processor.add_request("r", None, [1, 2, 3], params, arrival_time=0.0)
    finals = {0: 0, 1: 0}
    steps = [
        [EngineCoreOutput(first, [100]), EngineCoreOutput(second, [200])],
        [EngineCoreOutput(first, [101], finish_reason="length"), EngineCoreOutput(second, [201])],
        [EngineCoreOutput(second, [202])],
        [EngineCoreOutput(second, [203], finish_reason="length")],
    ]
    tokens: dict[int, list[int]] = {0: [], 1: []}
    for outputs in steps:
        results, _ = processor.process_outputs(outputs)
        for result in results:
            for completion in result.outputs:
                tokens[completion.index] += completion.token_ids
                finals[completion.index] += completion.finish_reason is not None
    assert finals == {0: 1, 1: 1}
    assert tokens == {0: [100, 101], 1: [200, 201, 202, 203]}
    assert not processor.has_unfinished_requests()


def test_final_only_output_holds_every_sample(default_loaded) -> None:
    processor = OutputProcessor(default_loaded.tokenizer)
    params = SamplingParams(n=2, max_tokens=2, output_kind=RequestOutputKind.FINAL_ONLY)
    first, second = processor.add_request("r", None, [1, 2, 3], params, arrival_time=0.0)
    assert processor.process_outputs([EngineCoreOutput(first, [5, 6], finish_reason="length")])[0] == []
    results, _ = processor.process_outputs([EngineCoreOutput(second, [7, 8], finish_reason="length")])
    assert [(c.index, c.token_ids) for c in results[0].outputs] == [(0, [5, 6]), (1, [7, 8])]
