"""Quality of a quantized engine against fp32 on the default model.

- perplexity of a fixed text (not the calibration text), from prompt logprobs;
- teacher-forced greedy agreement: along each prompt's fp32 greedy continuation, how often the
  quantized model's top-1 token is the fp32 token (no drift after a first difference);
- free-running agreement: position-wise equal tokens of the two greedy continuations (one early
  difference changes the rest of a sequence, so this is the noisiest of the three);
- with --decode-speed N: batch-1 decode tokens/s of both engines (one 256-token prompt, 128 greedy
  tokens), interleaved N times, medians.

The perplexity change of the fixed text moves with float-order differences that int8 rounding amplifies (the
same weights and scheme, kernels built for other CPUs or routed otherwise: W8A8 0.2-1.0%, W8A7 0.0-1.3% on the Zen 4;
with the text's first 175 tokens alone 0.4-2.0%); compare schemes by repeated runs.

    .venv/bin/python benchmarks/quant_quality.py --quantization int8 [--kv-cache-dtype int8]
        [--int8-activation-bits 7] [--max-tokens 64]
        [--decode-speed 5] [--output-json PATH]
    (--quantization none --kv-cache-dtype int8: the cache's own error; --quantization none --dtype bfloat16
     [--kv-cache-dtype float16|bfloat16]: a bf16 model's)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from tokenmill import LLM, SamplingParams

# Public-domain prose (Jerome K. Jerome, Three Men in a Boat, 1889, chapter I) for perplexity: 1212 tokens of the
# default model's tokenizer. Its first 175 alone measured an int8 model's change anywhere from 0.4% to 2.0% as
# kernels' rounding orders changed (the same weights, other CPUs' builds); over all of them, 0.0-1.3%.
PERPLEXITY_TEXT = (
    "There were four of us - George, and William Samuel Harris, and myself, and Montmorency. We were "
    "sitting in my room, smoking, and talking about how bad we were - bad from a medical point of view I "
    "mean, of course. We were all feeling seedy, and we were getting quite nervous about it. Harris said "
    "he felt such extraordinary fits of giddiness come over him at times, that he hardly knew what he was "
    "doing; and then George said that he had fits of giddiness too, and hardly knew what he was doing. "
    "With me, it was my liver that was out of order. I knew it was my liver that was out of order, because "
    "I had just been reading a patent liver-pill circular, in which were detailed the various symptoms by "
    "which a man could tell when his liver was out of order. I had them all. It is a most extraordinary "
    "thing, but I never read a patent medicine advertisement without being impelled to the conclusion that I "
    "am suffering from the particular disease therein dealt with in its most virulent form.\n\n"
    "I remember going to the British Museum one day to read up the treatment for some slight ailment of "
    "which I had a touch - hay fever, I fancy it was. I got down the book, and read all I came to read; and "
    "then, in an unthinking moment, I idly turned the leaves, and began to indolently study diseases, "
    "generally. I forget which was the first distemper I plunged into - some fearful, devastating scourge, I "
    "know - and, before I had glanced half down the list of \"premonitory symptoms,\" it was borne in upon me "
    "that I had fairly got it. I sat for a while, frozen with horror; and then, in the listlessness of "
    "despair, I again turned over the pages. I came to typhoid fever - read the symptoms - discovered that I "
    "had typhoid fever, must have had it for months without knowing it - wondered what else I had got; "
    "turned up St. Vitus's Dance - found, as I expected, that I had that too - began to get interested in my "
    "case, and determined to sift it to the bottom, and so started alphabetically - read up ague, and learnt "
    "that I was sickening for it, and that the acute stage would commence in about another fortnight. "
    "Bright's disease, I was relieved to find, I had only in a modified form, and, so far as that was "
    "concerned, I might live for years. Cholera I had, with severe complications; and diphtheria I seemed to "
    "have been born with. I plodded conscientiously through the twenty-six letters, and the only malady I "
    "could conclude I had not got was housemaid's knee.\n\n"
    "I felt rather hurt about this at first; it seemed somehow to be a sort of slight. Why hadn't I got "
    "housemaid's knee? Why this invidious reservation? After a while, however, less grasping feelings "
    "prevailed. I reflected that I had every other known malady in the pharmacology, and I grew less selfish, "
    "and determined to do without housemaid's knee.\n\n"
    "I sat and pondered. I thought what an interesting case I must be from a medical point of view, what an "
    "acquisition I should be to a class! Students would have no need to \"walk the hospitals,\" if they had "
    "me. I was a hospital in myself. All they need do would be to walk round me, and, after that, take their "
    "diploma.\n\n"
    "Then I wondered how long I had to live. I tried to examine myself. I felt my pulse. I could not at first "
    "feel any pulse at all. Then, all of a sudden, it seemed to start off. I pulled out my watch and timed "
    "it. I made it a hundred and forty-seven to the minute. I tried to feel my heart. I could not feel my "
    "heart. It had stopped beating. I have since been induced to come to the opinion that it must have been "
    "there all the time, and must have been beating, but I cannot account for it. I patted myself all over "
    "my front, from what I call my waist up to my head, and I went a bit round each side, and a little way "
    "up the back. But I could not feel or hear anything. I tried to look at my tongue. I stuck it out as far "
    "as ever it would go, and I shut one eye, and tried to examine it with the other. I could only see the "
    "tip, and the only thing that I could gain from that was to feel more certain than before that I had "
    "scarlet fever.\n\n"
    "I had walked into that reading-room a happy, healthy man. I crawled out a decrepit wreck.\n\n"
    "I went to my medical man. He is an old chum of mine, and feels my pulse, and looks at my tongue, and "
    "talks about the weather, all for nothing, when I fancy I'm ill; so I thought I would do him a good turn "
    "by going to him now. \"What a doctor wants,\" I said, \"is practice. He shall have me. He will get more "
    "practice out of me than out of seventeen hundred of your ordinary, commonplace patients, with only one "
    "or two diseases each.\" So I went straight up and saw him, and he said: \"Well, what's the matter with "
    "you?\" I said: \"I will not take up your time, dear boy, with telling you what is the matter with me. "
    "Life is brief, and you might pass away before I had finished. But I will tell you what is not the "
    "matter with me. I have not got housemaid's knee. Why I have not got housemaid's knee, I cannot tell "
    "you; but the fact remains that I have not got it. Everything else, however, I have got.\""
)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "The three primary colors are",
    "Write a haiku about autumn.",
    "import numpy as np\n\ndef normalize(x):",
    "The most important invention of the twentieth century was",
    "Q: What is 12 times 12?\nA:",
]


def perplexity(llm: LLM, text: str) -> float:
    out = llm.generate([text], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    total = [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
    return math.exp(-sum(total) / len(total))


def greedy(llm: LLM, max_tokens: int) -> list[list[int]]:
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def teacher_forced_agreement(llm: LLM, reference: list[list[int]]) -> float:
    """Share of reference tokens that are `llm`'s top-1 given the reference prefix."""
    tokenizer = llm.tokenizer
    prompts = [tokenizer.encode(p) + ref for p, ref in zip(PROMPTS, reference)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1), use_tqdm=False)
    hits = total = 0
    for out, ref in zip(outs, reference):
        ids, positions = out.prompt_token_ids, out.prompt_logprobs
        for i in range(len(ids) - len(ref), len(ids)):
            total += 1
            hits += positions[i][ids[i]].rank == 1
    return hits / total


def decode_tokens_per_s(llm: LLM, prompt: list[int], max_tokens: int = 128) -> float:
    """Batch-1 decode rate: the time of a max_tokens run minus that of a 1-token run (the prefill)."""
    def seconds(n: int) -> float:
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True, temperature=0), use_tqdm=False)
        return time.perf_counter() - start

    prefill = seconds(1)
    return (max_tokens - 1) / (seconds(max_tokens) - prefill)


def decode_speed(base: LLM, quant: LLM, repetitions: int) -> dict[str, float]:
    """Medians of interleaved runs, so load from other processes hits both engines alike."""
    prompt = [1000 + (i * 7919) % 40000 for i in range(256)]  # fixed pseudo-random token ids
    runs: dict[str, list[float]] = {"fp32": [], "quantized": []}
    for _ in range(repetitions):
        runs["fp32"].append(decode_tokens_per_s(base, prompt))
        runs["quantized"].append(decode_tokens_per_s(quant, prompt))
    fp32, quantized = statistics.median(runs["fp32"]), statistics.median(runs["quantized"])
    return {"decode_tok_s_fp32": fp32, "decode_tok_s_quantized": quantized, "decode_speedup": quantized / fp32}


def evaluate(quantization: str, max_tokens: int, speed_repetitions: int = 0,
             kv_cache_dtype: str = "auto", int8_activation_bits: int = 8, dtype: str = "auto") -> dict[str, Any]:
    base = LLM(num_blocks=1024, dtype="float32")  # `auto` is bf16 where the CPU multiplies bf16 natively
    reference = greedy(base, max_tokens)
    base_ppl = perplexity(base, PERPLEXITY_TEXT)
    if not speed_repetitions:
        del base  # one engine at a time unless both are timed
    quant = LLM(num_blocks=1024, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                int8_activation_bits=int8_activation_bits, dtype=dtype)
    q_greedy = greedy(quant, max_tokens)
    free = sum(a == b for r, q in zip(reference, q_greedy) for a, b in zip(r, q)) / sum(map(len, reference))
    report = {
        "quantization": quantization, "dtype": dtype, "kv_cache_dtype": kv_cache_dtype,
        "int8_activation_bits": int8_activation_bits, "max_tokens": max_tokens,
        "num_prompts": len(PROMPTS),
        "perplexity_fp32": base_ppl, "perplexity_quantized": perplexity(quant, PERPLEXITY_TEXT),
        "teacher_forced_agreement": teacher_forced_agreement(quant, reference),
        "free_running_agreement": free,
    }
    if speed_repetitions:
        report.update(decode_speed(base, quant, speed_repetitions))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantization", default="int8")
    parser.add_argument("--kv-cache-dtype", default="auto",
                        help="of the quantized engine (auto, float32, float16, bfloat16, int8); fp32's stays float32")
    parser.add_argument("--dtype", default="auto",
                        help="of the quantized engine (auto, float32, bfloat16: --quantization none --dtype bfloat16 "
                             "measures a bf16 model); the reference is float32")
    parser.add_argument("--int8-activation-bits", type=int, default=8, choices=[8, 7],
                        help="with --quantization int8: 7 for the faster paired tile")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--decode-speed", type=int, default=0, metavar="N",
                        help="also time batch-1 decode of both engines, N interleaved repetitions")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    report = evaluate(args.quantization, args.max_tokens, args.decode_speed, args.kv_cache_dtype,
                      args.int8_activation_bits, args.dtype)
    report["perplexity_change"] = report["perplexity_quantized"] / report["perplexity_fp32"] - 1
    for key, value in report.items():
        print(f"{key:>26}: {value:.4f}" if isinstance(value, float) else f"{key:>26}: {value}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
