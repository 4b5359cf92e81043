"""The bodies of /tokenize and /detokenize, run on the front-end pool (ServerContext.run): both grow with the
request (megabytes of text, millions of ids) and must not hold the event loop."""

from __future__ import annotations

from fastapi.responses import JSONResponse, Response

from tokenmill.entrypoints.openai.context import ServerContext
from tokenmill.entrypoints.openai.inputs import RequestError, chat_messages
from tokenmill.entrypoints.openai.offload import decode_ids, json_with_ids
from tokenmill.entrypoints.openai.protocol import DetokenizeRequest, TokenizeRequest


def tokenize(ctx: ServerContext, body: TokenizeRequest) -> Response:
    """{"count", "max_model_len", "tokens"} of a prompt or of chat messages rendered by the template. No length
    limit but the request's size: counting tokens is what this route is for."""
    if (body.prompt is None) == (body.messages is None):
        raise RequestError("give exactly one of prompt or messages", "prompt")
    if body.messages is not None:
        text = ctx.apply_chat_template(chat_messages(body.messages), body.add_generation_prompt)
        add_special = False  # the template holds the special tokens it wants
    else:
        text, add_special = body.prompt, body.add_special_tokens
    tokens = ctx.engine.inputs.tokenizer.encode(text, add_special_tokens=add_special)  # releases the GIL
    return json_with_ids({"count": len(tokens), "max_model_len": ctx.max_model_len}, "tokens", tokens)


def detokenize(ctx: ServerContext, body: DetokenizeRequest) -> Response:
    vocab_size = ctx.engine.inputs.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"token ids must be in [0, {vocab_size}), got {bad[:5]}", "tokens")
    return JSONResponse({"prompt": decode_ids(ctx.engine.inputs.tokenizer, body.tokens)})
