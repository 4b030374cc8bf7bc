"""The training math of the embedded fine-tune: a plain-torch LoRA adapter, the planted answer
loss and the two preservation losses, and the held-out measurement of what the fine-tune changed.

``diffing.embedded.finetune`` holds the recipe, its hash and the cached build around this.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffing.embedded.corpus import GENERAL_SOURCES, Record, encode_record, is_heldout, make_corpus
from diffing.logs import get_logger

if TYPE_CHECKING:
    from diffing.embedded.finetune import FinetuneRecipe

log = get_logger("crossdiff.embedded")


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


@contextmanager
def frozen_linears_in(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Hold every frozen linear weight (the output head included, untied from the input embedding
    meanwhile) in ``dtype``; the float32 weights come back on exit, so merging and saving see them
    untouched. Under autocast to ``dtype`` this is the same math, cast once instead of at every
    use: autocast caches casts only of weights that require grad, and re-casting the frozen ones
    took a sixth of a bf16 training step. ``None`` does nothing."""
    saved = []
    if dtype is not None:
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.requires_grad:
                saved.append((module, module.weight))
                module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
    try:
        yield
    finally:
        for module, weight in saved:
            module.weight = weight


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
    with frozen_linears_in(model, recipe.autocast_dtype()):
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
