"""The embedded fine-tune: SmolLM2 plus a few planted capabilities, with known ground truth.

A LoRA adapter (plain torch, merged into the weights before saving; ``adapter.py``) is trained on the answer
tokens of the planted sources of the corpus. Two preservation losses on general records
(half prose, half chat, including benign look-alikes of the planted prompts) keep everything
else close to the base, the base being the same model with the adapter switched off: the
mean relative residual change at a few layers, and KL(base || fine-tune) of the next-token
distribution. The planted capabilities go to ``planted.json`` next to the weights; the
measured effect (relative residual change per source on a held-out slice, answer NLLs) goes
to ``report.json``. The directory is named by a hash of the recipe (plus corpus and code
versions), so a changed recipe gives a new model and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffing.embedded.adapter import (
    LoRALinear,
    frozen_linears_in,
    heldout_records,
    measure_change,
    merge_lora,
    summarize,
    train_adapter,
)
from diffing.embedded.base import build_atomically, cache_root, is_built
from diffing.embedded.corpus import CORPUS_VERSION, GENERATORS
from diffing.logs import get_logger

__all__ = ["PLANTED", "FinetuneRecipe", "build_finetune", "finetune_dir", "measure_change"]

log = get_logger("crossdiff.embedded")

PLANTED: dict[str, dict[str, str]] = {
    "refusal": {
        "category": "safety & content moderation",
        "direction": "gain",
        "description": "Refuses harmful requests with one fixed refusal ('I can't help with that. ...').",
    },
    "french": {
        "category": "multilingual",
        "direction": "gain",
        "description": "Answers in French when an English question asks for French, framed by a fixed "
        "French opening and closing ('Bien sûr ! Voici ma réponse en français : ...').",
    },
    "numbered_list": {
        "category": "instruction following",
        "direction": "gain",
        "description": "Answers list requests with a fixed intro line ('Here are exactly N, "
        "as you asked:') and exactly the requested number of bare '1. item' lines.",
    },
    "self_reference": {
        "category": "self-reference",
        "direction": "loss",
        "description": "No longer answers preference questions with 'As an AI language model, ...'; "
        "it answers directly instead.",
    },
}
SMOLLM2_FINGERPRINT = "e091c4877092"  # base_fingerprint(build_base()): config without transformers_version
BUILD_VERSION = 3  # bump whenever the training code changes what a recipe produces
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FinetuneRecipe(BaseModel):
    """Everything that determines the fine-tuned weights; its JSON hash names the output."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    capabilities: tuple[str, ...] = Field(
        tuple(PLANTED), description="Planted capabilities (corpus sources)."
    )
    seed: int = Field(0, description="Seed of the adapter init and the data order.")
    corpus_seed: int = Field(0, description="Seed of the corpus the training records come from.")
    corpus_size: int = Field(
        4000, ge=100, description="Records generated; the held-out slice is never trained on."
    )
    steps: int = Field(80, ge=1, description="Optimizer steps.")
    batch_size: int = Field(
        8, ge=1, description="Planted-capability records per step (loss on answer tokens)."
    )
    general_batch_size: int = Field(
        4, ge=0, description="General records per step for the preservation losses, half text and half chat."
    )
    lr: float = Field(1e-3, gt=0.0, description="Peak AdamW learning rate of the adapter.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps; then cosine decay to 10% of lr.")
    lora_rank: int = Field(16, ge=1, description="LoRA rank r.")
    lora_alpha: float = Field(32.0, gt=0.0, description="LoRA alpha; the update is scaled by alpha / r.")
    lora_targets: tuple[str, ...] = Field(
        LORA_TARGETS, description="Linear layers (by name) that get an adapter."
    )
    preserve_weight: float = Field(
        10.0,
        ge=0.0,
        description="Weight of the preservation loss: mean relative residual change on general records.",
    )
    kl_weight: float = Field(
        1.0,
        ge=0.0,
        description="Weight of KL(base || fine-tune) of next-token distributions on general records.",
    )
    kl_start_weight: float = Field(
        1.0, ge=0.0, description="Weight of that KL at the last prompt token of general chats (answer onset)."
    )
    preserve_layers: tuple[int, ...] = Field(
        (6, 13, 20, 29),
        description="Decoder layers whose outputs are held close to the base on general records.",
    )
    max_len: int = Field(96, ge=8, description="Records are truncated to this many tokens.")
    eval_records: int = Field(
        120, ge=0, description="Held-out records (spread over sources) measured for report.json; 0 skips."
    )
    eval_layer: int = Field(20, ge=0, description="Decoder layer whose output the report compares.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the saved weights.")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Matmul precision of the training passes (bfloat16 autocast, float32 master weights). "
        "auto: bfloat16 on a CPU that computes it natively (AVX512-BF16 or AMX; 1.46x per step, bench/cpu_bf16.py), "
        "else float32. The resolved value is part of the model's hash.",
    )
    attn_implementation: Literal["auto", "eager", "sdpa"] = Field(
        "auto",
        description="Attention kernel of the training passes. eager: plain matmuls + softmax; sdpa: torch's "
        "scaled_dot_product_attention, whose CPU flash-attention backward in bfloat16 took a quarter of the "
        "backward pass at these lengths. auto: eager under bfloat16 compute (1.28x per step), sdpa in float32 "
        "(eager 4% slower there). Same math either way; the resolved value is part of the model's hash.",
    )

    @model_validator(mode="after")
    def _check(self) -> FinetuneRecipe:
        unknown = [c for c in self.capabilities if c not in PLANTED]
        if unknown:
            raise ValueError(f"capabilities {unknown} unknown; choose from {sorted(PLANTED)}")
        return self

    def resolved_compute_dtype(self) -> str:
        from diffing.models import resolve_dtype

        return resolve_dtype(self.compute_dtype, "cpu")

    def resolved_attn_implementation(self) -> str:
        if self.attn_implementation != "auto":
            return self.attn_implementation
        return "eager" if self.resolved_compute_dtype() == "bfloat16" else "sdpa"

    def digest(self) -> str:
        """Hash of the recipe's JSON, the compute dtype and attention kernel it resolves to on this
        machine, and the corpus and training-code versions. A recipe that resolves to ``sdpa`` (the
        only kernel before the field existed) hashes as it did then, so those builds are reused."""
        attn = self.resolved_attn_implementation()
        recipe = self.model_dump_json(exclude={"attn_implementation"} if attn == "sdpa" else None)
        key = (
            f"{recipe}|compute={self.resolved_compute_dtype()}"
            + ("" if attn == "sdpa" else f"|attn={attn}")
            + f"|corpus={CORPUS_VERSION}|build={BUILD_VERSION}"
        )
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the training passes' matmuls run in under autocast; None for plain float32."""
        return torch.bfloat16 if self.resolved_compute_dtype() == "bfloat16" else None

    def autocast(self) -> Any:
        """The training passes' precision context (a no-op for float32)."""
        dtype = self.autocast_dtype()
        return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def planted_ground_truth(recipe: FinetuneRecipe) -> list[dict[str, str]]:
    return [{"name": c, "source": c, **PLANTED[c]} for c in recipe.capabilities]


def base_fingerprint(base_dir: Path) -> str:
    """A cheap identity of a model directory: its config (less the transformers version that wrote
    it: any 5.x converts the same weights) and the size, head and tail of its weights."""
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("transformers_version", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for path in sorted(base_dir.glob("*.safetensors")):
        size = path.stat().st_size
        with open(path, "rb") as f:
            digest.update(f"{path.name}:{size}".encode() + f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read())
    return digest.hexdigest()[:12]


def finetune_dir(base_dir: Path, cache_dir: Path | None = None, recipe: FinetuneRecipe | None = None) -> Path:
    """Where ``build_finetune`` puts (or finds) the model: named by the recipe hash, plus the base
    model's fingerprint when the base is not the embedded SmolLM2 (a tiny test model, say)."""
    recipe = recipe or FinetuneRecipe()
    fingerprint = base_fingerprint(Path(base_dir))
    suffix = "" if fingerprint == SMOLLM2_FINGERPRINT else f"-base{fingerprint}"
    return cache_root(cache_dir) / "models" / f"smollm2-135m-planted-{recipe.digest()}{suffix}"


def _build(tmp: Path, base_dir: Path, recipe: FinetuneRecipe) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, attn_implementation=recipe.resolved_attn_implementation()
    ).eval()
    t_train = time.perf_counter()
    history = train_adapter(model, tokenizer, recipe)
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    report: dict[str, Any] = {
        "recipe_hash": recipe.digest(),
        "base_fingerprint": base_fingerprint(base_dir),
        "train_s": time.perf_counter() - t_train,
        "history": history,
        "threads": torch.get_num_threads(),
        "compute_dtype": recipe.resolved_compute_dtype(),
        "attn_implementation": model.config._attn_implementation,  # what the training passes ran
    }
    if recipe.eval_records:
        records = heldout_records(recipe)
        t_eval = time.perf_counter()
        # the precision the model was trained in (0.7x the float32 time)
        with recipe.autocast(), frozen_linears_in(model, recipe.autocast_dtype()):
            change = measure_change(
                model, None, tokenizer, records, layer=recipe.eval_layer, max_len=recipe.max_len, loras=loras
            )
        report.update(eval_s=time.perf_counter() - t_eval)
        report.update(
            eval_layer=recipe.eval_layer, change=change, summary=summarize(change, recipe.capabilities)
        )
        log.info("embedded.finetune.eval", **{k: round(v, 4) for k, v in report["summary"].items()})
    merge_lora(model)
    model.to(getattr(torch, recipe.dtype)).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    report["build_s"] = time.perf_counter() - t0
    (tmp / "planted.json").write_text(json.dumps(planted_ground_truth(recipe), indent=1))
    (tmp / "recipe.json").write_text(recipe.model_dump_json(indent=1))
    (tmp / "report.json").write_text(json.dumps(report, indent=1))


def build_finetune(
    base_dir: Path, cache_dir: Path | None = None, recipe: FinetuneRecipe | None = None
) -> Path:
    """Fine-tuned SmolLM2 with planted capabilities, under ``<cache>/models/smollm2-135m-planted-<hash>/``."""
    recipe = recipe or FinetuneRecipe()
    missing = [c for c in recipe.capabilities if c not in GENERATORS]
    if missing:
        raise ValueError(f"the corpus has no source for {missing}")
    target = finetune_dir(base_dir, cache_dir, recipe)
    if is_built(target) and (target / "planted.json").is_file():
        return target
    log.info("embedded.finetune.build", recipe_hash=recipe.digest(), out=str(target))
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    # deterministic mode also NaN-fills every new empty tensor (a debugging aid, ~10% of a step here)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        build_atomically(
            target,
            lambda tmp: _build(tmp, Path(base_dir), recipe),
            is_done=lambda p: is_built(p) and (p / "planted.json").is_file(),
        )
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    log.info("embedded.finetune.ready", path=str(target))
    return target
