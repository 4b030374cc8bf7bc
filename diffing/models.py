"""Models and tokens for harvesting: load once, tokenise identically, stop after layer L.

Site: the residual stream after decoder layer L (HF `hidden_states[L+1]` for L below the last
layer; Mamba's list starts after layer 0, so there it is `hidden_states[L]`). A forward hook on layer L captures its output and aborts the forward pass, so the layers
above L never run.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HarvestInputError(ValueError):
    """Bad models, corpus or layer, phrased for the user."""


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def resolve_device(name: str, field: str = "device") -> torch.device:
    """``auto``: cuda where a GPU is visible, else cpu; a cuda device asked for without a GPU is
    an error naming ``field`` (the config field that asked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{field}={name} but no GPU is visible; use {field}=auto or cpu")
    return torch.device(name)


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


def attention_kernel(config: Any) -> str | None:
    """``eager`` for models that softcap attention logits (Gemma 2): transformers' sdpa kernel skips
    the softcap, so activations would differ from the model's own; None (the default kernel) else."""
    text = getattr(config, "text_config", None) or config
    return "eager" if getattr(text, "attn_logit_softcapping", None) else None


def load_model(
    path: str,
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    keep_layers: int | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """``dtype``: float32, bfloat16, float16, or auto (see ``resolve_dtype``). ``keep_layers``: drop
    the decoder layers past the first ones before the model moves to ``device`` (the harvest stops
    after its layer: Gemma-2-9b at layer 20 keeps 21 of 42 layers, half its GPU memory).
    ``revision``: a hub model's commit, tag or branch (None: the default branch, or a local dir).
    ``trust_remote_code``: run the model's own code (models[].trust_remote_code)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code} | (
        {"revision": revision} if revision else {}
    )
    try:
        kernel = attention_kernel(AutoConfig.from_pretrained(path, **kw))
        extra = {"attn_implementation": kernel} if kernel else {}
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_DTYPES[resolve_dtype(dtype, device)], **extra, **kw
        )
    except OSError as e:
        raise HarvestInputError(f"cannot load model {path!r}: {e}{remote_code_hint(e)}") from None
    except ValueError as e:  # "Unrecognized model ..." (a LoRA adapter directory, say)
        hint = (
            " (a LoRA/PEFT adapter directory? merge it into its base model first)"
            if (Path(path) / "adapter_config.json").exists()
            else remote_code_hint(e)
        )
        raise HarvestInputError(f"cannot load model {path!r}: {e}{hint}") from None
    model.eval().requires_grad_(False)
    if keep_layers is not None:
        keep_first_layers(model, keep_layers)
    return model.to(device)


def keep_first_layers(model: nn.Module, n: int) -> nn.Module:
    """Drops the decoder layers past the first ``n``, in place (a harvest at layer L needs L + 1).
    The list is found as ``decoder_layers`` finds it (known names, then the fallback)."""
    layers = decoder_layers(model)
    if n < len(layers):
        del layers[n:]
    return model


def remote_code_hint(e: Exception) -> str:
    """transformers asks for trust_remote_code=True, a flag crossdiff sets from the config."""
    if "trust_remote_code" not in str(e):
        return ""
    return (
        " (crossdiff passes that flag from the config: set models[].trust_remote_code: true for "
        "this model, which runs its own Python code wherever it loads)"
    )


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code} | (
        {"revision": revision} if revision else {}
    )
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:  # ValueError: no tokenizer files to build one from
        raise HarvestInputError(f"cannot load the tokenizer of {path!r}: {e}{remote_code_hint(e)}") from None
    # a document longer than context_length keeps its beginning whatever the model's own default
    # (some chat fine-tunes ship truncation_side="left"): its first tokens are the ones dropped as
    # attention sinks, and every model must cut it at the same place
    tok.truncation_side = "right"
    return tok


def _named_layers(model: nn.Module) -> nn.ModuleList | None:
    for name in (
        "model.layers",  # Llama, Gemma, Qwen, Mistral, Phi, OLMo, ...
        "model.language_model.layers",  # Gemma 3 and other multimodal wrappers
        "transformer.h",  # GPT-2, GPT-J, BLOOM, Falcon
        "gpt_neox.layers",  # Pythia
        "model.decoder.layers",  # OPT
        "transformer.blocks",  # MPT
        "backbone.layers",  # Mamba
    ):
        mod: Any = model
        for part in name.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList):
            return mod
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder block list of a causal LM (Llama/Gemma/Qwen/Mistral, GPT-2, GPT-NeoX, ...)."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    named = _named_layers(model)
    if named is not None:
        return named
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
    out = captured[0]
    if out.dim() != 3 or tuple(out.shape[:2]) != tuple(input_ids.shape):
        # Gemma 3n's layers return their stacked AltUp streams [4, B, T, D]: no one residual stream
        raise HarvestInputError(
            f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r}): decoder "
            f"layer {layer} returns a tensor of shape {tuple(out.shape)}, not one residual stream "
            f"[batch, tokens, d_model] = [{input_ids.shape[0]}, {input_ids.shape[1]}, d_model]; crossdiff "
            "harvests architectures whose layers carry a single residual stream (Gemma 3n is not one)"
        )
    return out


# ----------------------------------------------------------------------------------------------
# Tokens


@dataclass
class TokenizedDoc:
    doc_id: int
    ids: list[int]
    keep: list[bool]  # False for BOS and the first raw-text tokens
    source: str
    record_id: str


CHAT_DATE = datetime.date(2024, 1, 1)


def _chat_date(fmt: str) -> str:
    """Templates that print today's date (Llama 3.2/3.3: ``strftime_now("%d %b %Y")``) get a fixed
    one, so a harvest resumed on another day renders the same tokens."""
    return CHAT_DATE.strftime(fmt)


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
            raise HarvestInputError(
                f"record {record.get('id')!r} is a chat (`messages`) but no model's tokenizer has a chat "
                "template; give the corpus as raw `text`, or use a model directory with one"
            )
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, strftime_now=_chat_date), False
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


def encode_truncated(tokenizer, text: str, *, add_special_tokens: bool, max_length: int) -> list[int]:
    """``tokenizer(text, truncation=True, max_length=max_length)["input_ids"]`` without tokenising
    all of a long text (a book-length document took a second per megabyte for 128 tokens kept):
    growing prefixes are tokenised until one holds ``max_length`` tokens with a margin to spare,
    since cutting a text changes only the tokens next to the cut."""
    n = max(4096, 32 * max_length)
    while n < len(text) and getattr(tokenizer, "truncation_side", "right") == "right":
        head = text[:n]
        if len(tokenizer(head, add_special_tokens=False)["input_ids"]) >= max_length + 64:
            text = head
            break
        n *= 4
    return tokenizer(text, add_special_tokens=add_special_tokens, truncation=True, max_length=max_length)[
        "input_ids"
    ]


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer,
    *,
    context_length: int,
    drop_first_raw_tokens: int,
    doc_id_start: int,
) -> list[TokenizedDoc]:
    """Tokenise records; chat transcripts keep their template tokens, raw text loses its first
    `drop_first_raw_tokens` tokens (attention-sink outliers), and BOS is never kept. A chat's first
    token is never kept either: BOS, or the template's opening token where there is no BOS
    (Qwen's ``<|im_start|>``), the attention sink of the transcript."""
    docs = []
    bos = tokenizer.bos_token_id
    for i, rec in enumerate(records):
        text, raw = render(rec, tokenizer)
        add_special = raw  # chat templates already contain their special tokens
        ids = encode_truncated(tokenizer, text, add_special_tokens=add_special, max_length=context_length)
        keep = [True] * len(ids)
        first = 0
        if ids and ((bos is not None and ids[0] == bos) or not raw):
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


def share_chat_template(tokenizers: Sequence[Any], names: Sequence[str]) -> str | None:
    """Chats are rendered once, with the first model's chat template, and every model reads those
    tokens. A first model without a template (a base model ships none) borrows the first template
    among the others; -> the name of the model whose template renders chats (None: no model has one)."""
    if not tokenizers:
        return None
    for tok, name in zip(tokenizers, names, strict=True):
        if getattr(tok, "chat_template", None) is not None:
            if tok is not tokenizers[0] and getattr(tokenizers[0], "chat_template", None) is None:
                tokenizers[0].chat_template = tok.chat_template
            return name
    return None


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _ids(tok, text: str, add_special: bool, max_length: int | None) -> list[int]:
    if max_length is None:
        return tok(text, add_special_tokens=add_special)["input_ids"]
    return encode_truncated(tok, text, add_special_tokens=add_special, max_length=max_length)


def check_vocab(
    tok, records: Sequence[dict[str, Any]], vocab_sizes: dict[str, int | None], max_length: int | None = None
) -> None:
    """Every token id the harvest feeds (the records as `tok` reads them) must have a row in every
    model's embedding: a tokenizer with tokens its model lacks (a special token added for a chat
    template, say) fails mid-harvest, on a GPU as a device-side assert. Fail here, naming both."""
    limits = {n: v for n, v in vocab_sizes.items() if v}
    if not limits:
        return
    smallest = min(limits.values())
    for rec in records:
        text, raw = render(rec, tok)
        ids = _ids(tok, text, raw, max_length)
        if ids and max(ids) >= smallest:
            bad = max(ids)
            lacking = sorted(n for n, v in limits.items() if bad >= v)
            raise HarvestInputError(
                f"record {rec.get('id')!r} has the token {tok.convert_ids_to_tokens(bad)!r} (id {bad}), but "
                f"model(s) {lacking} embed only {min(limits[n] for n in lacking)} tokens (config vocab_size): "
                "the tokenizer has tokens the model lacks (one added for a chat template?); use a tokenizer "
                "and chat template every model was trained with"
            )


def check_tokenizers_agree(
    tokenizers: Sequence[Any],
    records: Sequence[dict[str, Any]],
    names: Sequence[str],
    max_length: int | None = None,
) -> None:
    """Every model must read the same token ids from the text the harvest feeds them (chats rendered by
    the first model's template, raw text with special tokens; the first `max_length` tokens, what the
    harvest keeps); fail naming the model, the record and the first position where the ids differ."""
    if len(tokenizers) < 2:
        return
    ref_tok = tokenizers[0]
    for rec in records:
        text, raw = render(rec, ref_tok)
        ref = _ids(ref_tok, text, raw, max_length)
        for tok, name in zip(tokenizers[1:], names[1:], strict=True):
            ids = _ids(tok, text, raw, max_length)
            if ids == ref:
                continue
            i = _first_difference(ref, ids)
            shown = [  # the ids too: two vocabularies may spell different ids alike
                f"{n!r} has ids {x[i : i + 3]} = {t.convert_ids_to_tokens(x[i : i + 3])}"
                if i < len(x)
                else f"{n!r} ends"
                for n, t, x in ((names[0], ref_tok, ref), (name, tok, ids))
            ]
            why = ""
            if i == 0 and raw and (ref[1:] == ids or ids[1:] == ref):
                why = " (one tokenizer adds a BOS token, the other does not: check add_bos_token)"
            raise HarvestInputError(
                f"tokenizers disagree: model {name!r} reads record {rec.get('id')!r} as other token ids than "
                f"{names[0]!r}: at token {i}, {' and '.join(shown)}{why}; a crosscoder needs the same tokens "
                "in every model (use models that share one tokenizer)"
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
