"""Ready-made pipeline configs on the embedded models (built offline, cached).

- ``tiny``: the tiny random Llama pair (seconds per stage): the test suite's end-to-end path.
- ``embedded``: SmolLM2-135M-Instruct vs its planted fine-tune (``make demo``), with the planted
  ground truth attached so the report can check what the pipeline found against it.

A preset is a plain config dict: ``--set`` overrides apply on top, then it validates like any
user config. Building the models happens here (cached under $CROSSDIFF_CACHE).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffing.logs import get_logger

PRESETS = ("tiny", "embedded")


def _corpus(out: Path, n: int, seed: int) -> str:
    from diffing.embedded import write_corpus

    path = out / "corpus.jsonl"
    if not path.exists():
        tmp = write_corpus(out / ".corpus.jsonl.tmp", n=n, seed=seed)
        tmp.replace(path)
    return str(path)


def tiny(out: Path) -> dict[str, Any]:
    from diffing.embedded import TinyConfig, build_tiny_pair

    base, ft = build_tiny_pair(config=TinyConfig(tokenizer="bytes"))
    # the judge: a tiny random model with a long context (byte tokens make labelling prompts long)
    judge, _ = build_tiny_pair(config=TinyConfig(tokenizer="bytes", max_position_embeddings=8192))
    return {
        "out": str(out),
        "harvest": {
            "models": [{"name": "base", "path": str(base)}, {"name": "ft", "path": str(ft)}],
            "layer": 2,
            "corpus": {"uri": _corpus(out, 96, 0)},
            "context_length": 96,
            "prompts_per_shard": 24,
            "batch_prompts": 8,
            "outlier_norm_mult": 10.0,
            "ray": {"num_actors": 1, "num_cpus_per_actor": 0.5},
        },
        "fit": {
            "crosscoder": {"expansion_factor": 4, "k": 8, "dead_after_tokens": 20_000},
            "train": {"batch_size": 256, "lr": 2e-3, "epochs": 2, "log_every": 20, "eval_tokens": 4096},
        },
        "analyze": {"max_tokens": 16_384},
        # the tiny random model as the judge: the real vLLM path, nonsense labels (plumbing only)
        "label": {
            "service": {
                "judge": {
                    "model_source": str(judge),
                    "model_id": "tiny-judge",
                    "engine_kwargs": {"max_model_len": 8192},
                }
            }
        },
    }


def embedded(out: Path) -> dict[str, Any]:
    import json

    from diffing.embedded import build_base, build_finetune

    log = get_logger("preset")
    log.info("preset.build", what="SmolLM2-135M-Instruct base (one-time, ~1 min)")
    base = build_base()
    log.info("preset.build", what="planted fine-tune (one-time, ~5 min on 2 cores)")
    ft = build_finetune(base)
    planted = json.loads((ft / "planted.json").read_text())
    return {
        "out": str(out),
        "harvest": {
            "models": [{"name": "base", "path": str(base)}, {"name": "ft", "path": str(ft)}],
            "layer": 20,
            "corpus": {"uri": _corpus(out, 1600, 0)},
            "context_length": 128,
            "prompts_per_shard": 100,
            "batch_prompts": 16,
            "drop_first_raw_tokens": 2,
            "outlier_norm_mult": 3.0,
            "ray": {"num_actors": 1, "num_cpus_per_actor": 1.0},
        },
        "fit": {
            "crosscoder": {"expansion_factor": 4, "k": 32},
            "train": {"batch_size": 1024, "lr": 1e-3, "epochs": 5, "log_every": 25},
        },
        "analyze": {},
        "label": {},
        "planted": [
            {k: str(v) for k, v in p.items() if k in ("name", "source", "category", "direction")}
            for p in planted
        ],
    }


def preset(name: str, out: Path) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} is unknown; choose from {list(PRESETS)}")
    return {"tiny": tiny, "embedded": embedded}[name](Path(out))
