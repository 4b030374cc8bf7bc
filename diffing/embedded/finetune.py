"""The embedded fine-tune: SmolLM2 plus a few planted capabilities, with known ground truth.

A LoRA adapter (plain torch, merged into the weights before saving) is trained on the answer
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
import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from diffing.embedded.base import build_atomically, cache_root, is_built
from diffing.embedded.corpus import (
    CORPUS_VERSION,
    GENERAL_SOURCES,
    GENERATORS,
    Record,
    encode_record,
    is_heldout,
    make_corpus,
)
from diffing.logs import get_logger

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
SMOLLM2_FINGERPRINT = "02abf71a461e"  # base_fingerprint(build_base()) with transformers 5.19
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

    def autocast(self) -> Any:
        """The training passes' precision context (a no-op for float32)."""
        bf16 = self.resolved_compute_dtype() == "bfloat16"
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B(A(x))`` with B initialised to zero; ``enabled`` switches it off."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.enabled = True
        self.lora_a = nn.Parameter(
            torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features)
        )
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.enabled:
            out = out + self.scale * ((x @ self.lora_a.t()) @ self.lora_b.t())
        return out

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += self.scale * (self.lora_b @ self.lora_a)
        return self.base


def add_lora(model: nn.Module, recipe: FinetuneRecipe) -> list[LoRALinear]:
    """Freeze ``model`` and wrap every targeted linear layer in a ``LoRALinear``."""
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(recipe.seed)
    wrapped = []
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in recipe.lora_targets and isinstance(child, nn.Linear):
                lora = LoRALinear(child, recipe.lora_rank, recipe.lora_alpha, gen)
                setattr(module, child_name, lora)
                wrapped.append(lora)
    if not wrapped:
        raise ValueError(f"no linear layer named any of {recipe.lora_targets}")
    return wrapped


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())


@contextmanager
def lora_disabled(loras: list[LoRALinear]) -> Iterator[None]:
    for lora in loras:
        lora.enabled = False
    try:
        yield
    finally:
        for lora in loras:
            lora.enabled = True


def _collate(tokenizer: Any, records: list[Record], max_len: int) -> dict[str, torch.Tensor]:
    encoded = [encode_record(tokenizer, r, max_len) for r in records]
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(encoded), width), dtype=torch.long)
    answer = torch.zeros((len(encoded), width), dtype=torch.bool)
    for i, (row, mask) in enumerate(encoded):
        ids[i, : len(row)] = torch.tensor(row)
        attn[i, : len(row)] = 1
        answer[i, : len(row)] = torch.tensor(mask)
    return {"input_ids": ids, "attention_mask": attn, "answer": answer}


def _answer_nll(model: nn.Module, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token NLL of the answer tokens, predicted from the position before each."""
    target_mask = batch["answer"][:, 1:]
    logits = model.lm_head(hidden[:, :-1][target_mask])
    return nn.functional.cross_entropy(
        logits.float(), batch["input_ids"][:, 1:][target_mask], reduction="none"
    )


def _relative_change(h_ft: torch.Tensor, h_base: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over unmasked tokens of ||h_ft - h_base|| / ||h_base|| (smoothed so the gradient at 0 is finite)."""
    base_sq = h_base.pow(2).sum(-1)
    err = ((h_ft - h_base).pow(2).sum(-1) + 1e-8 * base_sq).sqrt() / (base_sq.sqrt() + 1e-6)
    return (err * mask).sum() / mask.sum()


def _cycle(records: list[Record], size: int, rng: random.Random) -> Iterator[list[Record]]:
    while True:
        order = records[:]
        rng.shuffle(order)
        for i in range(0, len(order) - size + 1, size):
            yield order[i : i + size]


def _lr_at(step: int, recipe: FinetuneRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _forward(model: nn.Module, batch: dict[str, torch.Tensor], hidden_states: bool = False) -> Any:
    """The decoder stack only: callers apply ``lm_head`` to the few positions they need."""
    return model.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=hidden_states,
    )


def _kl(model: nn.Module, h_base: torch.Tensor, h_ft: torch.Tensor) -> torch.Tensor:
    """Mean KL(base || fine-tune) of the next-token distributions read from final hidden states."""
    with torch.no_grad():
        logp_base = torch.log_softmax(model.lm_head(h_base).float(), dim=-1)
    logp_ft = torch.log_softmax(model.lm_head(h_ft).float(), dim=-1)
    return (logp_base.exp() * (logp_base - logp_ft)).sum(-1).mean()


def _preservation_losses(
    model: nn.Module, loras: list[LoRALinear], batch: dict[str, torch.Tensor], layers: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean relative residual change at ``layers``; next-token KL(base || fine-tune) over all
    tokens, and at the last prompt token of each chat (where the answer's mode is chosen)."""
    with torch.no_grad(), lora_disabled(loras):
        h_base = _forward(model, batch, hidden_states=True).hidden_states
    h_ft = _forward(model, batch, hidden_states=True).hidden_states
    mask = batch["attention_mask"].float()
    preserve = sum(_relative_change(h_ft[i + 1], h_base[i + 1], mask) for i in layers) / len(layers)
    valid = batch["attention_mask"].bool()
    kl = _kl(model, h_base[-1][valid], h_ft[-1][valid])
    starts = batch["answer"].float().argmax(dim=1)  # first answer token; 0 for raw text
    rows = (starts > 0).nonzero().squeeze(1)
    kl_start = _kl(model, h_base[-1][rows, starts[rows] - 1], h_ft[-1][rows, starts[rows] - 1])
    return preserve, kl, kl_start if len(rows) else torch.zeros(())


def train_adapter(model: nn.Module, tokenizer: Any, recipe: FinetuneRecipe) -> list[dict[str, float]]:
    """Add LoRA adapters to ``model`` and train them; returns the loss history (adapters stay unmerged)."""
    corpus = make_corpus(recipe.corpus_size, seed=recipe.corpus_seed, variant="train")
    corpus = [r for r in corpus if not is_heldout(r)]
    rng = random.Random(recipe.seed)
    planted = _cycle([r for r in corpus if r["source"] in recipe.capabilities], recipe.batch_size, rng)
    n_text = recipe.general_batch_size // 2
    n_chat = recipe.general_batch_size - n_text
    text = _cycle([r for r in corpus if r["source"] == "general_text"], max(1, n_text), rng)
    chat = _cycle([r for r in corpus if r["source"] == "general_chat"], max(1, n_chat), rng)
    loras = add_lora(model, recipe)
    opt = torch.optim.AdamW(
        [p for lora in loras for p in (lora.lora_a, lora.lora_b)], lr=recipe.lr, weight_decay=0.0
    )
    history, t0 = [], time.perf_counter()
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe)
        batch = _collate(tokenizer, next(planted), recipe.max_len)
        with recipe.autocast():
            ce = _answer_nll(model, _forward(model, batch).last_hidden_state, batch).mean()
            loss, preserve, kl, kl_start = ce, torch.zeros(()), torch.zeros(()), torch.zeros(())
            if recipe.general_batch_size:
                general = (next(text) if n_text else []) + (next(chat) if n_chat else [])
                g = _collate(tokenizer, general, recipe.max_len)
                preserve, kl, kl_start = _preservation_losses(model, loras, g, recipe.preserve_layers)
                loss = (
                    loss
                    + recipe.preserve_weight * preserve
                    + recipe.kl_weight * kl
                    + recipe.kl_start_weight * kl_start
                )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(
            {
                "step": step,
                "ce": ce.item(),
                "preserve": preserve.item(),
                "kl": kl.item(),
                "kl_start": kl_start.item(),
            }
        )
        if step % 10 == 0 or step == recipe.steps - 1:
            elapsed = round(time.perf_counter() - t0, 1)
            log.info("embedded.finetune.step", **history[-1], elapsed_s=elapsed)
    return history


def heldout_records(recipe: FinetuneRecipe, n: int | None = None) -> list[Record]:
    """Up to ``n`` held-out harvest records, spread evenly over the general and planted sources."""
    n = recipe.eval_records if n is None else n
    sources = [*GENERAL_SOURCES, *recipe.capabilities]
    pool = [r for r in make_corpus(recipe.corpus_size, seed=recipe.corpus_seed) if is_heldout(r)]
    return [r for s in sources for r in [r for r in pool if r["source"] == s][: n // len(sources)]]


@torch.no_grad()
def measure_change(
    base: nn.Module,
    finetuned: nn.Module | None,
    tokenizer: Any,
    records: list[Record],
    *,
    layer: int = 20,
    max_len: int = 96,
    loras: list[LoRALinear] | None = None,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    """Per source: mean per-token ||h_ft - h_base|| / ||h_base|| after decoder ``layer`` (over all
    tokens and over answer tokens) and the answer NLL per token under each model, averaged over records.

    Give two models, or one model with ``loras`` (the base is the model with adapters off).
    """
    keys = ("rel_all", "n_all", "rel_answer", "n_answer", "nll_base", "nll_ft", "n_records")
    sums: dict[str, dict[str, float]] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        b = _collate(tokenizer, chunk, max_len)
        if loras is not None:
            with lora_disabled(loras):
                out_base = _forward(base, b, hidden_states=True)
            out_ft, ft = _forward(base, b, hidden_states=True), base
        else:
            out_base, out_ft, ft = _forward(base, b, True), _forward(finetuned, b, True), finetuned
        hb, hf = out_base.hidden_states[layer + 1], out_ft.hidden_states[layer + 1]
        rel = (hf - hb).norm(dim=-1) / hb.norm(dim=-1).clamp_min(1e-6)
        for i, rec in enumerate(chunk):
            one = {k: v[i : i + 1] for k, v in b.items()}
            valid, ans = one["attention_mask"][0].bool(), one["answer"][0]
            acc = sums.setdefault(rec["source"], dict.fromkeys(keys, 0.0))
            acc["rel_all"] += rel[i][valid].sum().item()
            acc["n_all"] += valid.sum().item()
            acc["rel_answer"] += rel[i][ans].sum().item()
            acc["n_answer"] += ans.sum().item()
            acc["nll_base"] += _answer_nll(base, out_base.last_hidden_state[i : i + 1], one).mean().item()
            acc["nll_ft"] += _answer_nll(ft, out_ft.last_hidden_state[i : i + 1], one).mean().item()
            acc["n_records"] += 1
    return {
        source: {
            "rel_change_all": a["rel_all"] / max(a["n_all"], 1),
            "rel_change_answer": a["rel_answer"] / max(a["n_answer"], 1),
            "answer_nll_base": a["nll_base"] / a["n_records"],
            "answer_nll_finetune": a["nll_ft"] / a["n_records"],
            "n_records": int(a["n_records"]),
        }
        for source, a in sums.items()
    }


def summarize(change: dict[str, dict[str, float]], capabilities: tuple[str, ...]) -> dict[str, float]:
    """General vs planted change: the quality metric is ``ratio`` (lower is better)."""
    general = [change[s]["rel_change_all"] for s in GENERAL_SOURCES if s in change]
    planted = [change[s]["rel_change_answer"] for s in capabilities if s in change]
    g, p = sum(general) / max(len(general), 1), sum(planted) / max(len(planted), 1)
    return {"general_rel_change": g, "planted_answer_rel_change": p, "ratio": g / p if p else float("nan")}


def planted_ground_truth(recipe: FinetuneRecipe) -> list[dict[str, str]]:
    return [{"name": c, "source": c, **PLANTED[c]} for c in recipe.capabilities]


def base_fingerprint(base_dir: Path) -> str:
    """A cheap identity of a model directory: its config and the size, head and tail of its weights."""
    digest = hashlib.sha256((base_dir / "config.json").read_bytes())
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
        with recipe.autocast():  # the precision the model was trained in (0.7x the float32 time)
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
