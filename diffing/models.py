"""Models and tokens for harvesting: load once, tokenise identically, stop after layer L.

Site: the residual stream after decoder layer L (HF `hidden_states[L+1]` for L below the last
layer). A forward hook on layer L captures its output and aborts the forward pass, so the layers
above L never run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HarvestInputError(ValueError):
    """Bad models, corpus or layer, phrased for the user."""


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX. Elsewhere (AVX2-only CPUs) bfloat16 is emulated and ~4x slower than
    float32, while natively it is ~2x faster (docs/benchmarks.md)."""
    device = torch.device(device)
    if device.type == "cuda":  # Ampere or newer; older cards only emulate bf16
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: absent in old torch
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> str:
    """``auto``: bfloat16 where ``device`` computes it natively, else float32; others unchanged."""
    if name != "auto":
        return name
    return "bfloat16" if native_bf16(device) else "float32"


def load_model(path: str, *, dtype: str = "float32", device: str | torch.device = "cpu") -> nn.Module:
    """``dtype``: float32, bfloat16, float16, or auto (see ``resolve_dtype``)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[resolve_dtype(dtype, device)])
    except OSError as e:
        raise HarvestInputError(f"cannot load model {path!r}: {e}") from None
    model.eval().requires_grad_(False)
    return model.to(device)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise HarvestInputError(f"cannot load the tokenizer of {path!r}: {e}") from None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder block list of a causal LM (Llama/Gemma/Qwen/Mistral, GPT-2, GPT-NeoX, ...)."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for name in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers"):
        mod: Any = model
        for part in name.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList):
            return mod
    for mod in model.modules():  # fallback: the first ModuleList with one entry per layer
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise HarvestInputError(f"cannot find the decoder layers of {type(model).__name__}")


def n_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


class _Stop(Exception):
    pass


@torch.no_grad()
def residual_after_layer(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, layer: int) -> Tensor:
    """Residual stream after decoder layer `layer` [B, T, D]; layers above it are not run."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise HarvestInputError(
            f"layer={layer} is out of range: the model has {len(layers)} decoder layers (0..{len(layers) - 1})"
        )
    captured: list[Tensor] = []

    def hook(_mod, _inp, out):
        captured.append(out[0] if isinstance(out, tuple) else out)
        raise _Stop

    handle = layers[layer].register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the layer hook did not fire")
    return captured[0]


# ----------------------------------------------------------------------------------------------
# Tokens


@dataclass
class TokenizedDoc:
    doc_id: int
    ids: list[int]
    keep: list[bool]  # False for BOS and the first raw-text tokens
    source: str
    record_id: str


def render(record: dict[str, Any], tokenizer) -> tuple[str, bool]:
    """Text to tokenise and whether it is raw text (True) or a chat transcript (False)."""
    if record.get("messages") is not None:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs
        ):
            raise HarvestInputError(
                f"record {record.get('id')!r}: `messages` must be a list of {{role: str, content: str}}"
            )
        if getattr(tokenizer, "chat_template", None) is None:
            raise HarvestInputError("chat records need a tokenizer with a chat template")
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False), False
        except Exception as e:  # jinja2's TemplateError (raise_exception in the template) and friends
            hint = "; Gemma's, for one, has no system role and needs user/assistant turns that alternate"
            raise HarvestInputError(
                f"record {record.get('id')!r}: the model's chat template rejects its messages "
                f"({type(e).__name__}: {e}){hint if 'role' in str(e).lower() else ''}"
            ) from None
    text = record.get("text")
    if not isinstance(text, str):
        raise HarvestInputError(f"record {record.get('id')!r} has neither a `text` string nor `messages`")
    return text, True


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer,
    *,
    context_length: int,
    drop_first_raw_tokens: int,
    doc_id_start: int,
) -> list[TokenizedDoc]:
    """Tokenise records; chat transcripts keep their template tokens, raw text loses its first
    `drop_first_raw_tokens` tokens (attention-sink outliers), and BOS is never kept."""
    docs = []
    bos = tokenizer.bos_token_id
    for i, rec in enumerate(records):
        text, raw = render(rec, tokenizer)
        add_special = raw  # chat templates already contain their special tokens
        ids = tokenizer(text, add_special_tokens=add_special, truncation=True, max_length=context_length)[
            "input_ids"
        ]
        keep = [True] * len(ids)
        first = 0
        if ids and bos is not None and ids[0] == bos:
            keep[0] = False
            first = 1
        if raw:
            for j in range(first, min(len(ids), first + drop_first_raw_tokens)):
                keep[j] = False
        docs.append(
            TokenizedDoc(
                doc_id_start + i, ids, keep, str(rec.get("source", "")), str(rec.get("id", doc_id_start + i))
            )
        )
    return docs


def check_tokenizers_agree(
    tokenizers: Sequence[Any], records: Sequence[dict[str, Any]], names: Sequence[str]
) -> None:
    """All models must see the same token ids; fail naming the first record that differs."""
    if len(tokenizers) < 2:
        return
    for rec in records:
        ref_text, _ = render(rec, tokenizers[0])
        ref = tokenizers[0](ref_text, add_special_tokens=True)["input_ids"]
        for tok, name in zip(tokenizers[1:], names[1:], strict=True):
            text, _ = render(rec, tok)
            ids = tok(text, add_special_tokens=True)["input_ids"]
            if text != ref_text or ids != ref:
                raise HarvestInputError(
                    f"tokenizers disagree: model {name!r} tokenises record {rec.get('id')!r} differently from "
                    f"{names[0]!r}; a crosscoder needs the same tokens in every model (use models with one tokenizer)"
                )


def pad_batch(docs: Sequence[TokenizedDoc], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded input_ids and attention_mask [B, T]."""
    T = max(len(d.ids) for d in docs)
    ids = torch.full((len(docs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), T), dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d.ids)] = torch.tensor(d.ids)
        mask[i, : len(d.ids)] = 1
    return ids, mask
