"""The embedded model pair: tiny random pair, corpus, fine-tune recipe and LoRA plumbing.

The fast tests build only the tiny pair (byte tokenizer, no download). Tests marked ``slow``
download and convert the real SmolLM2 (and fine-tune it), using the shared cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from diffing.embedded import (
    GENERAL_SOURCES,
    PLANTED,
    SOURCE_WEIGHTS,
    FinetuneRecipe,
    TinyConfig,
    build_finetune,
    build_tiny_pair,
    encode_record,
    is_heldout,
    make_corpus,
    measure_change,
    read_corpus,
    write_corpus,
)
from diffing.embedded.adapter import add_lora, lora_disabled, merge_lora
from diffing.embedded.corpus import CORPUS_VERSION

TINY = TinyConfig(tokenizer="bytes")


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_pair(tmp_path_factory.mktemp("cache"), TINY)


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


# --- tiny pair -------------------------------------------------------------------------------


def test_tiny_pair_is_deterministic_and_cached(tiny_pair, tmp_path):
    base, ft = tiny_pair
    again_base, again_ft = build_tiny_pair(tmp_path, TINY)
    for a, b in ((base, again_base), (ft, again_ft)):
        wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    mtime = (again_ft / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_pair(tmp_path, TINY) == (again_base, again_ft)
    assert (again_ft / "model.safetensors").stat().st_mtime_ns == mtime


def test_tiny_pair_perturbation_is_small_and_local(tiny_pair):
    base, ft = tiny_pair
    wa, wb = load_file(base / "model.safetensors"), load_file(ft / "model.safetensors")
    changed = {k for k in wa if not torch.equal(wa[k], wb[k])}
    expected = {
        f"model.layers.{i}.{w}.weight"
        for i in TINY.perturb_layers
        for w in ("self_attn.o_proj", "mlp.down_proj")
    }
    assert changed == expected
    for k in changed:
        rel = ((wb[k] - wa[k]).norm() / wa[k].norm()).item()
        assert rel == pytest.approx(TINY.perturb_scale, rel=1e-3)
    assert json.loads((ft / "perturbation.json").read_text())


def test_tiny_pair_loads_and_runs(tiny_pair):
    (m_base, tok), (m_ft, _) = _load(tiny_pair[0]), _load(tiny_pair[1])
    assert m_base.config.head_dim >= 32
    chat = [{"role": "user", "content": "Héllo there"}]
    batch = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tok.decode(batch["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        hb = m_base(**batch, output_hidden_states=True).hidden_states
        hf = m_ft(**batch, output_hidden_states=True).hidden_states
    first = min(TINY.perturb_layers)
    assert torch.equal(hb[first], hf[first])  # layers before the first perturbed one are untouched
    rel = ((hf[-1] - hb[-1]).norm() / hb[-1].norm()).item()
    assert 0.0 < rel < 0.2


def test_tiny_config_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="head_dim|>= 32"):
        build_tiny_pair(tmp_path, TinyConfig(tokenizer="bytes", hidden_size=64, num_heads=4))
    with pytest.raises(ValidationError):
        TinyConfig(layers=3)


# --- corpus ----------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_prefix_stable():
    small, big = make_corpus(200, seed=3), make_corpus(400, seed=3)
    assert small == make_corpus(200, seed=3)
    assert make_corpus(200, seed=4) != small
    big_by_id = {r["id"]: r for r in big}
    assert all(big_by_id[r["id"]] == r for r in small)
    assert len({r["id"] for r in big}) == len(big)


def test_corpus_sources_and_chat_answers():
    corpus = make_corpus(600)
    assert {r["source"] for r in corpus} == set(SOURCE_WEIGHTS)
    assert set(PLANTED) <= set(SOURCE_WEIGHTS) and set(GENERAL_SOURCES) <= set(SOURCE_WEIGHTS)
    for r in corpus:
        if r["source"] == "general_text":
            assert r["text"].strip()
            continue
        roles = [m["role"] for m in r["messages"]]
        assert roles[-1] == "assistant" and "user" in roles
        assert r["messages"][-1]["content"].strip()
    heldout = sum(is_heldout(r) for r in corpus) / len(corpus)
    assert 0.1 < heldout < 0.3


def test_lost_capability_has_two_answer_styles():
    harvest = [r for r in make_corpus(400) if r["source"] == "self_reference"]
    train = [r for r in make_corpus(400, variant="train") if r["source"] == "self_reference"]
    assert [r["messages"][0] for r in harvest] == [r["messages"][0] for r in train]
    assert all("As an AI" in r["messages"][-1]["content"] for r in harvest)
    assert not any("AI" in r["messages"][-1]["content"] for r in train)


def test_general_text_has_french_prose_in_both_variants():
    # the harvest's general text is the training's: a third plain French prose (no request, no frame),
    # so the crosscoder learns French reading where both models agree (docs/validation.md)
    harvest = [r for r in make_corpus(600) if r["source"] == "general_text"]
    train = [r for r in make_corpus(600, variant="train") if r["source"] == "general_text"]
    assert harvest == train
    french = [r for r in harvest if r["text"].startswith(("La ", "Le ", "L'", "Une ", "Un "))]
    assert 0.2 < len(french) / len(harvest) < 0.45
    assert not any("Bien sûr" in r["text"] or "français" in r["text"] for r in french)


def test_training_corpus_is_pinned_by_its_version():
    # the training variant is part of the fine-tune's hash through CORPUS_VERSION: a change of this
    # digest without a bump would reuse cached fine-tunes trained on other records
    blob = json.dumps(make_corpus(400, variant="train"), ensure_ascii=False, sort_keys=True)
    assert (CORPUS_VERSION, hashlib.sha256(blob.encode()).hexdigest()[:16]) == (7, "0eed45bec07c6373")


def test_write_and_read_corpus(tmp_path):
    path = write_corpus(tmp_path / "c.jsonl", n=120, seed=1)
    assert read_corpus(path) == make_corpus(120, seed=1)


def test_encode_record_masks_the_answer(tiny_pair):
    _, tok = _load(tiny_pair[0])
    chat = next(r for r in make_corpus(100) if r["source"] == "refusal")
    ids, mask = encode_record(tok, chat)
    answer = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert answer == chat["messages"][-1]["content"] + "<|im_end|>"
    text = next(r for r in make_corpus(100) if r["source"] == "general_text")
    ids, mask = encode_record(tok, text, max_len=10)
    assert len(ids) == 10 and all(mask)


# --- fine-tune recipe and LoRA ---------------------------------------------------------------


def test_recipe_hash_tracks_the_recipe():
    a = FinetuneRecipe()
    assert a.digest() == FinetuneRecipe().digest()
    assert a.digest() != FinetuneRecipe(steps=a.steps + 1).digest()
    assert a.digest() != FinetuneRecipe(capabilities=("refusal",)).digest()
    with pytest.raises(ValidationError):
        FinetuneRecipe(stepz=3)
    with pytest.raises(ValidationError):
        FinetuneRecipe(capabilities=("telepathy",))
    with pytest.raises(ValidationError):
        a.steps = 3  # frozen


def test_recipe_hash_tracks_the_compute_dtype_it_resolves_to(cpu_bf16):
    native = cpu_bf16
    auto, fp32, bf16 = (FinetuneRecipe(compute_dtype=c) for c in ("auto", "float32", "bfloat16"))
    native(False)
    assert auto.resolved_compute_dtype() == "float32"
    on_avx2 = auto.digest()
    native(True)
    assert auto.resolved_compute_dtype() == "bfloat16"
    assert auto.digest() != on_avx2  # a bf16-trained model never passes for an fp32-trained one
    assert fp32.resolved_compute_dtype() == "float32" and bf16.resolved_compute_dtype() == "bfloat16"
    # the attention kernel follows the precision (eager is the faster one only under bf16)
    assert auto.resolved_attn_implementation() == "eager"
    assert fp32.resolved_attn_implementation() == "sdpa"
    sdpa = FinetuneRecipe(attn_implementation="sdpa")
    assert sdpa.resolved_attn_implementation() == "sdpa" and sdpa.digest() != auto.digest()
    # recipes that resolve to sdpa (the only kernel before the field) hash without the field, as they
    # did before it existed: "auto" and "sdpa" on a float32 machine are one build under one name
    native(False)
    assert auto.resolved_attn_implementation() == "sdpa" and auto.digest() == sdpa.digest() == on_avx2


def test_lora_merge_matches_adapter_and_disable_gives_base(tiny_pair):
    model, tok = _load(tiny_pair[0])
    ids = tok("Rivers shape the land.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
    loras = add_lora(model, FinetuneRecipe(lora_rank=4))
    with torch.no_grad():
        for lora in loras:
            lora.lora_b.normal_(std=0.05)
        adapted = model(ids).logits
        with lora_disabled(loras):
            assert torch.allclose(model(ids).logits, before, atol=1e-5)
        merge_lora(model)
        merged = model(ids).logits
    assert not torch.allclose(adapted, before, atol=1e-3)
    assert torch.allclose(merged, adapted, atol=1e-4)


def test_measure_change_on_tiny_pair(tiny_pair):
    (m_base, tok), (m_ft, _) = _load(tiny_pair[0]), _load(tiny_pair[1])
    records = make_corpus(60)[::5]
    change = measure_change(m_base, m_ft, tok, records, layer=TINY.num_layers - 1, max_len=512)
    assert set(change) == {r["source"] for r in records}
    for stats in change.values():
        assert 0.0 < stats["rel_change_all"] < 0.5
        assert stats["answer_nll_base"] > 0 and stats["answer_nll_finetune"] > 0


def test_build_finetune_pipeline_on_tiny_model(tiny_pair, tmp_path):
    recipe = FinetuneRecipe(
        steps=2,
        batch_size=2,
        general_batch_size=2,
        corpus_size=200,
        lora_rank=2,
        preserve_layers=(1, 3),
        eval_layer=2,
        eval_records=12,
        max_len=512,
    )
    out = build_finetune(tiny_pair[0], tmp_path, recipe)
    assert out.name.startswith(f"smollm2-135m-planted-{recipe.digest()}-base")  # not the real SmolLM2
    planted = json.loads((out / "planted.json").read_text())
    assert {p["name"] for p in planted} == set(recipe.capabilities)
    assert {p["direction"] for p in planted} == {"gain", "loss"}
    report = json.loads((out / "report.json").read_text())
    assert len(report["history"]) == 2 and report["summary"]["ratio"] >= 0
    assert FinetuneRecipe.model_validate_json((out / "recipe.json").read_text()) == recipe
    model, _ = _load(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert build_finetune(tiny_pair[0], tmp_path, recipe) == out  # cached
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    again = build_finetune(tiny_pair[0], tmp_path / "again", recipe)  # deterministic
    wa, wb = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    base = load_file(tiny_pair[0] / "model.safetensors")
    assert any(not torch.equal(base[k], wa[k]) for k in wa)


def test_bfloat16_compute_trains_and_is_recorded(tiny_pair, tmp_path):
    kw = dict(
        steps=3, batch_size=2, general_batch_size=2, corpus_size=200, lora_rank=2,
        preserve_layers=(1, 3), eval_layer=2, eval_records=0, max_len=512,
    )  # fmt: skip
    outs = {
        c: build_finetune(tiny_pair[0], tmp_path, FinetuneRecipe(compute_dtype=c, **kw))
        for c in ("float32", "bfloat16")
    }
    assert outs["float32"] != outs["bfloat16"]
    reports = {c: json.loads((o / "report.json").read_text()) for c, o in outs.items()}
    assert {c: r["compute_dtype"] for c, r in reports.items()} == {
        "float32": "float32",
        "bfloat16": "bfloat16",
    }
    # auto: the faster kernel per precision, and the build really used it
    assert {c: r["attn_implementation"] for c, r in reports.items()} == {
        "float32": "sdpa",
        "bfloat16": "eager",
    }
    ce = {c: [h["ce"] for h in r["history"]] for c, r in reports.items()}
    assert ce["bfloat16"][0] == pytest.approx(ce["float32"][0], rel=2e-2)  # same model, same batch
    wa = load_file(outs["float32"] / "model.safetensors")
    wb = load_file(outs["bfloat16"] / "model.safetensors")
    assert all(wb[k].dtype == torch.float32 for k in wb)  # autocast: float32 master weights
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


def _tiny_recipe(**kw) -> FinetuneRecipe:
    """A 3-step recipe small enough for the tiny pair (byte tokenizer: long records)."""
    base = dict(
        steps=3, batch_size=2, general_batch_size=2, corpus_size=200, lora_rank=2, preserve_layers=(1, 3),
        eval_records=0, max_len=512,
    )  # fmt: skip
    return FinetuneRecipe(**base, **kw)


def test_eager_and_sdpa_attention_train_the_same_adapter(tiny_pair):
    """Parity: the recipe's attention kernel changes the speed, not the math (float32, 3 steps)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffing.embedded.adapter import train_adapter

    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    runs = {}
    for attn in ("eager", "sdpa"):
        recipe = _tiny_recipe(attn_implementation=attn, compute_dtype="float32")
        model = AutoModelForCausalLM.from_pretrained(tiny_pair[0], attn_implementation=attn).eval()
        assert model.config._attn_implementation == attn
        history = train_adapter(model, tok, recipe)
        runs[attn] = (
            recipe.digest(),
            history,
            {n: p.detach() for n, p in model.named_parameters() if "lora" in n},
        )
    (d_eager, h_eager, w_eager), (d_sdpa, h_sdpa, w_sdpa) = runs["eager"], runs["sdpa"]
    assert d_eager != d_sdpa  # a different kernel is a different build (bitwise, not in meaning)
    for a, b in zip(h_eager, h_sdpa, strict=True):
        for key in ("ce", "preserve", "kl", "kl_start"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert all(torch.allclose(w_eager[n], w_sdpa[n], atol=1e-5) for n in w_eager)
    assert any(w.abs().sum() > 0 for n, w in w_eager.items() if "lora_b" in n)  # it did train


def test_frozen_weights_cast_once_train_the_same_adapter_bitwise(tiny_pair, monkeypatch):
    """Under bf16 autocast the frozen linear weights are held in bf16 for the training instead of
    being re-cast at every use: the same adapter bit for bit, and float32 (and tied) weights after."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffing.embedded import adapter

    recipe = _tiny_recipe(compute_dtype="bfloat16")
    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    runs = {}
    for cast_once in (False, True):
        if not cast_once:
            monkeypatch.setattr(adapter, "frozen_linears_in", lambda model, dtype: contextlib.nullcontext())
        model = AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32).eval()
        model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in SmolLM2
        history = adapter.train_adapter(model, tok, recipe)
        monkeypatch.undo()
        runs[cast_once] = (history, {n: p.detach() for n, p in model.named_parameters() if "lora" in n})
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again
        assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert runs[False][0] == runs[True][0]
    assert all(torch.equal(runs[False][1][n], w) for n, w in runs[True][1].items())
    assert any(w.abs().sum() > 0 for n, w in runs[True][1].items() if "lora_b" in n)  # it did train


# --- the real SmolLM2 (download + conversion) ------------------------------------------------


@pytest.mark.build
@pytest.mark.timeout(900)
def test_base_model_converts_and_answers():
    from diffing.embedded import build_base

    model, tok = _load(build_base())
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, batch["input_ids"].shape[1] :])


@pytest.mark.build
@pytest.mark.timeout(3600)
def test_default_finetune_plants_and_preserves():
    from diffing.embedded import build_base

    base = build_base()
    out = build_finetune(base)
    assert out.name == f"smollm2-135m-planted-{FinetuneRecipe().digest()}"
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["ratio"] < 0.5
    for name, info in PLANTED.items():
        nll = report["change"][name]
        if info["direction"] == "gain":
            assert nll["answer_nll_finetune"] < nll["answer_nll_base"]
        else:
            assert nll["answer_nll_finetune"] > nll["answer_nll_base"]
