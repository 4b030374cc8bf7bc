"""Ready-made pipeline configs on the embedded models (built offline, cached).

- ``tiny``: the tiny random Llama pair (seconds per stage): the test suite's end-to-end path.
- ``embedded``: SmolLM2-135M-Instruct vs its planted fine-tune (``make demo``), with the planted
  ground truth attached so the report can check what the pipeline found against it.

A preset is a plain config dict: ``--set`` overrides apply on top, then it validates like any
user config. Building the models happens here (cached under $CROSSDIFF_CACHE).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffing.logs import get_logger

PRESETS = ("tiny", "embedded")


def _corpus(out: str, n: int, seed: int, weights: dict[str, float] | None = None) -> str:
    """The embedded corpus as JSONL in the run, local or remote, written atomically (a temp file
    renamed, or one object upload). A run's corpus.jsonl from an older crossdiff whose corpus
    differs is left alone and this one goes to corpus-<hash>.jsonl: the new name changes the
    harvest's identity, so the pipeline redoes the harvest instead of pairing old prompts with a
    new fine-tune."""
    import hashlib
    import json

    import fsspec

    from diffing.embedded.corpus import iter_corpus
    from jobs.rundir import is_remote, join

    text = "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in iter_corpus(n, seed=seed, weights=weights)
    )

    def where(name: str) -> str:
        return join(out, name) if is_remote(out) else str(Path(out) / name)

    uri = where("corpus.jsonl")
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        if fs.cat_file(path) == text.encode("utf-8"):
            return uri
        uri = where(f"corpus-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl")
        fs, path = fsspec.core.url_to_fs(uri)
        if fs.exists(path):
            return uri
    if is_remote(out):
        fs.pipe_file(path, text.encode("utf-8"))
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # its own temp name: two fresh runs of the preset (two `make demo`s) load this before the
        # run is held, and one must not rename the other's half-written file
        tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return uri


# The demo's harvest mix: mostly general text and chat, so that a random latent's activation mass
# sits mostly off the planted prompts (the fine-tune's own training mix is fixed by its recipe).
DEMO_WEIGHTS = {
    "general_text": 0.35,
    "general_chat": 0.35,
    "refusal": 0.075,
    "french": 0.075,
    "numbered_list": 0.075,
    "self_reference": 0.075,
}


def tiny_models() -> tuple[Path, Path, Path]:
    """The tiny preset's base, fine-tune and judge, built once into the cache (cluster/images/
    Dockerfile.cpu bakes them: Serve replicas and harvest actors on other pods find them there)."""
    from diffing.embedded import TinyConfig, build_tiny_pair

    base, ft = build_tiny_pair(config=TinyConfig(tokenizer="bytes"))
    # the judge: a tiny random model with a long context (byte tokens make labelling prompts long)
    judge, _ = build_tiny_pair(config=TinyConfig(tokenizer="bytes", max_position_embeddings=8192))
    return base, ft, judge


def tiny(out: str) -> dict[str, Any]:
    base, ft, judge = tiny_models()
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


def embedded(out: str) -> dict[str, Any]:
    import json

    from diffing.embedded import build_base, build_finetune

    log = get_logger("preset")
    log.info("preset.build", what="SmolLM2-135M-Instruct base (one-time, ~1 min)")
    base = build_base()
    log.info(
        "preset.build", what="planted fine-tune (one-time: ~4-6 min on 2 cores with native bf16, ~13 without)"
    )
    ft = build_finetune(base)
    planted = json.loads((ft / "planted.json").read_text())
    return {
        "out": str(out),
        "harvest": {
            # bfloat16 where this CPU computes it natively (1.75x float32, bench/cpu_bf16.py), else float32
            "models": [
                {"name": "base", "path": str(base), "dtype": "auto"},
                {"name": "ft", "path": str(ft), "dtype": "auto"},
            ],
            "layer": 20,
            "corpus": {"uri": _corpus(out, 2000, 0, DEMO_WEIGHTS)},
            "context_length": 128,
            "prompts_per_shard": 100,
            "batch_prompts": 16,
            "drop_first_raw_tokens": 2,
            "outlier_norm_mult": 3.0,
            "ray": {
                "num_actors": 1,
                "num_cpus_per_actor": 2.0,
            },  # Ray sets the actor's torch threads from this
        },
        "fit": {
            # AuxK revives latents silent for 50k tokens (the default 1M is longer than this whole fit)
            "crosscoder": {"expansion_factor": 4, "k": 32, "dead_after_tokens": 50_000},
            "train": {"batch_size": 1024, "lr": 1e-3, "epochs": 5, "log_every": 25},
        },
        "analyze": {},
        # the 135M judge: six categories, not the paper's fourteen, and channel scoring instead of
        # asking it for a category (it answers one for everything; docs/labelling.md, docs/validation.md)
        "label": {
            # the category shift and the planted-truth checks read only the model-specific latents;
            # labelling the random shared baseline too costs a third more judge time on 2 cores
            "groups": ["base-specific", "ft-specific"],
            "service": {
                "taxonomy": str(Path(__file__).resolve().parents[1] / "serve" / "taxonomies" / "demo.yaml"),
                "method": {"classify_mode": "channel"},
            },
        },
        "planted": [
            {k: str(v) for k, v in p.items() if k in ("name", "source", "category", "direction")}
            for p in planted
        ],
    }


def preset(name: str, out: str | Path) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} is unknown; choose from {list(PRESETS)}")
    return {"tiny": tiny, "embedded": embedded}[name](str(out))
