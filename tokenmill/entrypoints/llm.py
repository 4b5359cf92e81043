"""The offline API: LLM.generate() and LLM.chat()."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Self

from tqdm.auto import tqdm

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine, Prompt
from tokenmill.engine.step_timer import NULL_TIMER, AnyStepTimer
from tokenmill.entrypoints.prompt_limits import text_too_long, token_bound
from tokenmill.logger import init_logger
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams

Message = dict[str, Any]
# vLLM's prompt dicts: {"prompt": text} (TextPrompt) or {"prompt_token_ids": [ids]} (TokensPrompt).
PromptDict = dict[str, Any]
PromptInput = Prompt | PromptDict
_PROMPT_KEYS = ("prompt", "prompt_token_ids")


def _from_dict(prompt: PromptDict, where: str) -> Prompt:
    """The text or token ids of a vLLM prompt dict; ValueError naming what is wrong with it."""
    unknown = sorted(set(prompt) - set(_PROMPT_KEYS))
    if unknown:
        raise ValueError(f"{where}: unsupported key(s) {unknown}; a prompt dict holds 'prompt' (text) or "
                         "'prompt_token_ids' (a list of token ids)")
    if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
        raise ValueError(f"{where}: a prompt dict needs exactly one of 'prompt' (text) or 'prompt_token_ids', "
                         f"got keys {sorted(prompt)}")
    if "prompt" in prompt:
        if not isinstance(prompt["prompt"], str):
            raise ValueError(f"{where}: 'prompt' must be a string, got {type(prompt['prompt']).__name__}")
        return prompt["prompt"]
    token_ids = prompt["prompt_token_ids"]
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence) or \
            not all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
        raise ValueError(f"{where}: 'prompt_token_ids' must be a list of token ids (ints)")
    return list(token_ids)


class LLM:
    """Offline batched generation. `LLM()` loads the embedded SmolLM2-135M-Instruct; `LLM(model=path)`
    takes an HF directory or a .gguf file. Other keyword arguments are EngineConfig fields
    (block_size, max_num_seqs, max_num_batched_tokens, kv_cache_memory, ...). `step_timer` (a
    tokenmill.engine.step_timer.StepTimer) collects the per-step time breakdown."""

    def __init__(self, model: str | None = None, step_timer: AnyStepTimer = NULL_TIMER, **engine_args: Any) -> None:
        init_logger()
        config = EngineConfig.from_kwargs(model=model, **engine_args)
        self.engine = LLMEngine(config, step_timer=step_timer)
        self._counter = itertools.count()
        self._token_bound = token_bound(self.engine.tokenizer)  # refuses hopelessly long texts before tokenizing

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def close(self) -> None:
        """Stops the other tensor-parallel ranks' processes, if any (idempotent); generate() cannot run after."""
        self.engine.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generates for one prompt or many; returns outputs in prompt order. A prompt is a text, a list of token
        ids, or vLLM's dict: {"prompt": text} or {"prompt_token_ids": [ids]}; a list may mix them."""
        prompt_list = self._as_prompt_list(prompts)
        return self._run(prompt_list, sampling_params, use_tqdm, priority, add_special_tokens=True)

    def chat(
        self,
        messages: list[Message] | Sequence[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generates replies to one conversation or many, rendered with the model's chat template."""
        if not messages:
            raise ValueError("messages must not be empty")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = [self.engine.apply_chat_template(conv, add_generation_prompt) for conv in conversations]
        return self._run(prompts, sampling_params, use_tqdm, None, add_special_tokens=False)

    @staticmethod
    def _as_prompt_list(prompts: PromptInput | Sequence[PromptInput]) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, dict):
            return [_from_dict(prompts, "prompt")]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # one prompt given as token ids
        return [_from_dict(p, f"prompts[{i}]") if isinstance(p, dict) else p for i, p in enumerate(prompts)]

    def _run(
        self, prompts: list[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool, priority: Sequence[int] | None, add_special_tokens: bool,
    ) -> list[RequestOutput]:
        if not prompts:
            raise ValueError("prompts must not be empty")
        if sampling_params is None:
            params_list = [SamplingParams()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        self._refuse_too_long(prompts)

        req_ids: list[str] = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list)):
                req_id = str(next(self._counter))
                params = params.clone(output_kind=RequestOutputKind.FINAL_ONLY)
                self.engine.add_request(
                    req_id, prompt, params, priority=priority[i] if priority else 0,
                    add_special_tokens=add_special_tokens,
                )
                req_ids.append(req_id)
        except ValueError:
            for req_id in req_ids:
                self.engine.abort_request(req_id)
            raise
        return self._run_engine(req_ids, use_tqdm)

    def _refuse_too_long(self, prompts: list[Prompt]) -> None:
        """ValueError for a text whose length alone proves it cannot fit the context (before tokenizing any)."""
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                too_long = text_too_long(prompt, self._token_bound, self.engine.max_model_len)
                if too_long is not None:
                    raise ValueError(too_long if len(prompts) == 1 else f"prompts[{i}]: {too_long}")

    def _run_engine(self, req_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        wanted = set(req_ids)
        with tqdm(total=len(req_ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True) as bar:
            try:
                while len(finished) < len(req_ids):
                    for output in self.engine.step():
                        if output.finished and output.request_id in wanted:
                            finished[output.request_id] = output
                            bar.update(1)
            except BaseException:
                for req_id in wanted - finished.keys():
                    self.engine.abort_request(req_id)
                raise
        return [finished[r] for r in req_ids]
