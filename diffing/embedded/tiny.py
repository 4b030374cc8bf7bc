"""A tiny random Llama pair for fast end-to-end tests: a base and a slightly perturbed copy.

Both models are real ``LlamaForCausalLM`` checkpoints (safetensors + config + tokenizer) that
load with ``from_pretrained``; they build in seconds. The second model is the first plus a
seeded low-rank perturbation of the attention output and MLP down projections in a few
layers, recorded in ``perturbation.json``. The tokenizer is SmolLM2's when the embedded base
model is already in the cache (nothing is downloaded for it), else a byte-level tokenizer
built offline with the same special tokens and chat template.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from diffing.embedded.base import BASE_NAME, build_atomically, cache_root, is_built
from diffing.logs import get_logger

log = get_logger("crossdiff.embedded")

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 as in SmolLM2


class TinyConfig(BaseModel):
    """Shape and perturbation of the tiny pair; its JSON hash names the cache directory."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    hidden_size: int = Field(64, ge=8, description="Residual stream width.")
    num_layers: int = Field(4, ge=1, description="Number of decoder layers.")
    num_heads: int = Field(
        2, ge=1, description="Attention heads; head_dim = hidden_size / num_heads (>= 32)."
    )
    intermediate_size: int = Field(128, ge=1, description="MLP hidden width.")
    max_position_embeddings: int = Field(1024, ge=16, description="Longest sequence the models accept.")
    tokenizer: Literal["auto", "smollm2", "bytes"] = Field(
        "auto", description="'smollm2' reuses the cached base tokenizer, 'bytes' builds one; 'auto' picks."
    )
    seed: int = Field(0, description="Seed of the base weights and of the perturbation.")
    perturb_layers: tuple[int, ...] = Field((2, 3), description="Decoder layers whose weights are perturbed.")
    perturb_rank: int = Field(4, ge=1, description="Rank of each weight perturbation.")
    perturb_scale: float = Field(
        0.05, gt=0.0, le=1.0, description="Frobenius norm of each perturbation relative to its weight."
    )


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (259 tokens), built without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _tokenizer(kind: str, root: Path):
    from transformers import AutoTokenizer

    if kind == "smollm2":
        base_dir = root / "models" / BASE_NAME
        if not is_built(base_dir):
            raise FileNotFoundError(
                f"tokenizer='smollm2' needs the base model at {base_dir}; run build_base()"
            )
        return AutoTokenizer.from_pretrained(base_dir)
    return byte_tokenizer()


def resolve_tokenizer_kind(config: TinyConfig, root: Path) -> str:
    if config.tokenizer != "auto":
        return config.tokenizer
    return "smollm2" if is_built(root / "models" / BASE_NAME) else "bytes"


def _perturb(model: torch.nn.Module, config: TinyConfig) -> list[dict]:
    """Add a seeded rank-r perturbation to o_proj and down_proj of the chosen layers."""
    gen = torch.Generator().manual_seed(config.seed + 1)
    record = []
    with torch.no_grad():
        for layer in config.perturb_layers:
            block = model.model.layers[layer]
            for name, lin in (
                ("self_attn.o_proj", block.self_attn.o_proj),
                ("mlp.down_proj", block.mlp.down_proj),
            ):
                w = lin.weight
                u = torch.randn(w.shape[0], config.perturb_rank, generator=gen)
                v = torch.randn(config.perturb_rank, w.shape[1], generator=gen)
                delta = u @ v
                delta *= config.perturb_scale * w.norm() / delta.norm()
                w.add_(delta.to(w.dtype))
                record.append({"layer": layer, "weight": name, "relative_norm": config.perturb_scale})
    return record


def _build_pair(tmp: Path, config: TinyConfig, tokenizer_kind: str, root: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(tokenizer_kind, root)
    head_dim = config.hidden_size // config.num_heads
    if head_dim * config.num_heads != config.hidden_size or head_dim < 32:
        raise ValueError(
            f"hidden_size/num_heads must be an integer >= 32, got {config.hidden_size}/{config.num_heads}"
        )
    bad = [i for i in config.perturb_layers if not 0 <= i < config.num_layers]
    if bad:
        raise ValueError(f"perturb_layers {bad} out of range for num_layers={config.num_layers}")
    llama = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        head_dim=head_dim,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(llama).eval()
    for name in ("base", "finetune"):
        if name == "finetune":
            (tmp / name).mkdir()
            (tmp / name / "perturbation.json").write_text(json.dumps(_perturb(model, config), indent=1))
        model.save_pretrained(tmp / name, safe_serialization=True)
        tok.save_pretrained(tmp / name)
    (tmp / "tiny_config.json").write_text(config.model_dump_json(indent=1))


# Bump when _build_pair changes what it writes (the cache directory's name changes with it).
TINY_BUILD_VERSION = 2


def build_tiny_pair(cache_dir: Path | None = None, config: TinyConfig | None = None) -> tuple[Path, Path]:
    """(base_dir, finetune_dir) of the tiny pair under ``<cache>/models/tiny-llama-<kind>-<hash>/``."""
    config = config or TinyConfig()
    root = cache_root(cache_dir)
    kind = resolve_tokenizer_kind(config, root)
    resolved = config.model_copy(update={"tokenizer": kind})
    import transformers

    # the builder's version and transformers' too: a pair built by older code is not reused
    key = f"{resolved.model_dump_json()}|build={TINY_BUILD_VERSION}|transformers={transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    target = root / "models" / f"tiny-llama-{kind}-{digest}"

    def done(path: Path) -> bool:
        return is_built(path / "base") and is_built(path / "finetune")

    build_atomically(target, lambda tmp: _build_pair(tmp, resolved, kind, root), is_done=done)
    log.info("embedded.tiny.ready", path=str(target), tokenizer=kind)
    return target / "base", target / "finetune"
