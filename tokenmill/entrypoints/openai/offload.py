"""Work the routes hand to the front-end thread pool (ServerContext.run), written so that a pool thread never
holds the GIL for long: a thread that holds it stalls the event loop as surely as work done on the loop.

- tokenizers' `encode` and `decode` hold the GIL for their whole run (seconds for megabytes of text); their
  batch forms release it while the Rust code works. tokenmill's Tokenizer encodes through `encode_batch_fast`
  already (loader/tokenizer.py); its backend's `decode_batch` of one gives exactly its `decode`.
- One json.dumps of a million-token list holds the GIL ~0.2 s; built in slices, the GIL changes hands between them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fastapi.responses import Response

from tokenmill.loader.tokenizer import Tokenizer

_SLICE = 32768  # token ids serialized per GIL-holding call (~2 ms)


def decode_ids(tokenizer: Any, token_ids: list[int]) -> str:
    """tokenizer.decode(token_ids), releasing the GIL while the tokenizer works where that gives the same text
    (tokenmill's Tokenizer without the clean-up of tokenization spaces)."""
    if isinstance(tokenizer, Tokenizer) and not tokenizer.clean_up_tokenization_spaces:
        return tokenizer.backend_tokenizer.decode_batch([token_ids], skip_special_tokens=False)[0]
    return tokenizer.decode(token_ids)


def _int_list_json(values: Sequence[int]) -> str:
    slices = (",".join(map(str, values[i:i + _SLICE])) for i in range(0, len(values), _SLICE))
    return "[" + ",".join(slices) + "]"


def json_with_ids(fields: dict[str, Any], key: str, ids: Sequence[int]) -> Response:
    """A JSON response of `fields` plus `key`: the (possibly huge) list of ints `ids`, serialized in slices."""
    head = json.dumps(fields)
    body = f'{head[:-1]}{", " if fields else ""}"{key}": {_int_list_json(ids)}}}'
    return Response(body.encode(), media_type="application/json")
