"""Grammar compilation off the engine loop, compiled once per constraint.

A compiled grammar is the grammar plus, per parser state, which tokens of the vocabulary may come next (xgrammar's
adaptive token mask cache): milliseconds for a small schema, much longer for a large one. `compile()` returns a
Future at once; one worker thread compiles (xgrammar releases the GIL while it does, and uses its own threads within
one grammar), so the engine keeps stepping. Futures are kept per StructuredOutputsParams.key (least recently used
dropped past `max_cached`): the same schema compiles once however many requests use it.

Only the engine thread calls compile(); the futures it returns complete on the compile thread.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tokenmill.structured.grammar import grammar_of_key, import_xgrammar, tokenizer_info
from tokenmill.structured.params import StructuredOutputsParams


class GrammarCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], max_cached: int = 256,
                 max_threads: int = 2) -> None:
        xgr = import_xgrammar()
        self.vocab_size = vocab_size
        self.tokenizer_info = tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-grammar")
        self._futures: OrderedDict[tuple[str, str, bool], Future] = OrderedDict()
        self.max_cached = max_cached

    def compile(self, params: StructuredOutputsParams) -> Future:
        """A Future of the xgrammar CompiledGrammar for `params` (done at once when compiled before). A failed
        compilation's Future holds its ValueError and is not kept: asking again tries again."""
        key = params.key
        future = self._futures.get(key)
        if future is not None and not (future.done() and future.exception() is not None):
            self._futures.move_to_end(key)
            return future
        future = self._pool.submit(self._compile, key)
        self._futures[key] = future
        while len(self._futures) > self.max_cached:
            self._futures.popitem(last=False)
        return future

    def _compile(self, key: tuple[str, str, bool]) -> Any:
        return self._compiler.compile_grammar(grammar_of_key(key))

    def close(self) -> None:
        """Stops the compile thread (pending compilations are cancelled); idempotent."""
        self._pool.shutdown(wait=False, cancel_futures=True)
