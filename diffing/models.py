"""Models and tokens for harvesting: load once, tokenise identically, stop after layer L.

Site: the residual stream after decoder layer L (HF `hidden_states[L+1]` for L below the last
layer; Mamba's list starts after layer 0, so there it is `hidden_states[L]`). A forward hook on layer L captures its output and aborts the forward pass, so the layers
above L never run.
"""

from __future__ import annotations

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
        raise HarvestInputError(f"cannot load model {path!r}: {e}{load_hint(path, e)}") from None
    except ValueError as e:  # "Unrecognized model ..." (a LoRA adapter directory, say)
        hint = (
            " (a LoRA/PEFT adapter directory? merge it into its base model first)"
            if (Path(path) / "adapter_config.json").exists()
            else load_hint(path, e)
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


def load_hint(path: str, e: Exception) -> str:
    """What to do about a model that does not load: a local path that is not there (transformers
    then talks of repo ids), or a request for trust_remote_code (a flag crossdiff sets from the
    config)."""
    p = Path(path).expanduser()
    if not p.exists() and (p.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1):
        where = "" if p.is_absolute() else f"; a relative path is read from {Path.cwd()}"
        return f" (no directory {p.resolve()} on this machine{where})"
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
        raise HarvestInputError(f"cannot load the tokenizer of {path!r}: {e}{load_hint(path, e)}") from None
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
