"""The harvest on architectures other than Llama: tiny random models built here (no hub), each
checked against transformers' own hidden states of the document run alone (the ground truth)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from diffing.batching import length_batches, length_regimes
from diffing.embedded.tiny import byte_tokenizer
from diffing.harvest import HarvestConfig, Harvester
from diffing.models import HarvestInputError, decoder_layers, load_model, residual_after_layer

V = 259  # the byte tokenizer's vocabulary


def _base(**kw):
    return dict(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    ) | kw  # fmt: skip


def _configs():
    import transformers as T

    return {
        "gpt2": lambda: T.GPT2Config(vocab_size=V, n_embd=64, n_layer=3, n_head=2, n_positions=512),
        "gpt_neox": lambda: T.GPTNeoXConfig(
            vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128
        ),
        "opt": lambda: T.OPTConfig(
            vocab_size=V,
            hidden_size=64,
            num_hidden_layers=3,
            ffn_dim=128,
            num_attention_heads=2,
            word_embed_proj_dim=64,
            pad_token_id=2,
        ),  # fmt: skip
        "mpt": lambda: T.MptConfig(vocab_size=V, d_model=64, n_layers=3, n_heads=2, max_seq_len=512),
        "qwen2": lambda: T.Qwen2Config(**_base()),
        # LongRoPE (Phi-3-mini-128k, Phi-3.5, Phi-4-mini): short factors up to 16 tokens here (4096 there)
        "phi3_longrope": lambda: T.Phi3Config(
            **_base(
                original_max_position_embeddings=16,
                rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [4.0] * 16},
            )
        ),
        # dynamic NTK: rescaled for every length past 16
        "llama_dynamic": lambda: T.LlamaConfig(
            **_base(max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
        ),
    }


def _build(tmp_path, name: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    d = tmp_path / f"{name}-{seed}"
    if not d.exists():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_configs()[name]())
        with torch.no_grad():  # large weights: every layer, position and pad matters
            for p in model.parameters():
                if p.dim() >= 2:
                    p.add_(0.08 * torch.randn_like(p))
        model.save_pretrained(d)
        byte_tokenizer().save_pretrained(d)
    return str(d)


TEXTS = ["Short text.", "A longer document that runs well past sixteen tokens, to the end.", "Mid-size doc!"]


def _truth(path: str, text: str, layer: int) -> torch.Tensor:
    """hidden_states[layer + 1] of the document alone, unpadded [T, D]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([byte_tokenizer()(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "opt", "mpt", "qwen2"])
def test_a_padded_batch_reads_each_document_as_alone_and_keep_layers_trims(tmp_path, arch):
    path = _build(tmp_path, arch)
    tok = byte_tokenizer()
    rows = [tok(t)["input_ids"] for t in TEXTS]
    T = max(map(len, rows))
    ids = torch.tensor([r + [2] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    full = load_model(path)
    trimmed = load_model(path, keep_layers=2)
    assert len(decoder_layers(full)) == 3 and len(decoder_layers(trimmed)) == 2  # OPT, MPT: kept all 3
    for layer in (0, 1):
        got = residual_after_layer(full, ids, mask, layer)
        assert torch.equal(residual_after_layer(trimmed, ids, mask, layer), got)
        for i, (text, r) in enumerate(zip(TEXTS, rows, strict=True)):
            want = _truth(path, text, layer)
            assert torch.allclose(got[i, : len(r)], want, rtol=1e-4, atol=1e-5), (arch, layer, i)


def test_length_regimes_read_from_the_config(tmp_path):
    from transformers import AutoConfig

    def regimes(name):
        return length_regimes(AutoConfig.from_pretrained(_build(tmp_path, name)))

    assert regimes("phi3_longrope") == [(16, False)]
    assert regimes("llama_dynamic") == [(16, True)]
    assert regimes("qwen2") == [] and regimes("gpt2") == []


def test_length_batches_never_cross_a_regime():
    docs = [SimpleNamespace(ids=[0] * n) for n in (3, 20, 5, 16, 17, 30, 0)]
    lengths = [[len(d.ids) for d in b] for b in length_batches(docs, 3)]
    assert lengths == [[3, 5, 16], [17, 20, 30]]  # sorted; the empty document has no rows
    assert [[len(d.ids) for d in b] for b in length_batches(docs, 3, [(16, False)])] == [
        [3, 5, 16],
        [17, 20, 30],
    ]
    assert [[len(d.ids) for d in b] for b in length_batches(docs, 4, [(16, False)])] == [
        [3, 5, 16],
        [17, 20, 30],
    ]
    assert [[len(d.ids) for d in b] for b in length_batches(docs, 4, [(16, True)])] == [
        [3, 5, 16],
        [17],
        [20],
        [30],
    ]


@pytest.mark.parametrize("arch", ["phi3_longrope", "llama_dynamic"])
def test_rows_do_not_depend_on_the_batch_where_positions_scale_with_it(tmp_path, arch):
    """Without length_batches, the short document batched with the long one was read with the long
    one's positions (0.5 relative error for LongRoPE)."""
    path = _build(tmp_path, arch)
    records = [{"id": str(i), "text": t} for i, t in enumerate(TEXTS)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def rows(batch_prompts: int):
        cfg = HarvestConfig.model_validate(
            dict(
                models=[{"name": "a", "path": path}, {"name": "b", "path": path}], layer=1,
                corpus={"uri": str(tmp_path / "c.jsonl")}, store=str(tmp_path / "s"), device="cpu",
                store_dtype="float32", context_length=128, batch_prompts=batch_prompts,
                outlier_norm_mult=None, drop_first_raw_tokens=0,
            )
        )  # fmt: skip
        return Harvester(cfg).run(records, 0)

    together, alone = rows(3), rows(1)
    for doc, text in enumerate(TEXTS):
        want = _truth(path, text, 1)
        for out in (together, alone):
            got = torch.as_tensor(out["acts"][out["doc_id"] == doc, 0]).float()
            assert torch.allclose(got, want[-len(got) :], rtol=1e-4, atol=1e-4), (arch, doc)


def test_a_model_whose_layers_return_several_streams_is_refused_by_name():
    """Gemma 3n's layers return [4, B, T, D] (stacked AltUp streams): a clear error, not a shape
    error deep in the harvest."""

    class Layer(torch.nn.Module):
        def forward(self, x):
            return torch.stack([x] * 4)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=1, model_type="gemma3n_text")
            self.emb = torch.nn.Embedding(10, 8)
            self.model = SimpleNamespace(layers=torch.nn.ModuleList([Layer()]))
            self.layers = self.model.layers

        def forward(self, input_ids, attention_mask, use_cache):
            return self.layers[0](self.emb(input_ids))

    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(HarvestInputError, match=r"shape \(4, 2, 5, 8\), not one residual stream.*Gemma 3n"):
        residual_after_layer(Model(), ids, torch.ones_like(ids), 0)


def test_tokenizers_that_spell_different_ids_alike_are_shown_with_their_ids(tmp_path):
    """Two vocabularies that swap the ids of "a" and "b": each side decodes to the same text, so the
    message shows the ids."""
    from diffing.tokens import check_tokenizers_agree

    a = byte_tokenizer()
    vocab = a.backend_tokenizer.to_str()
    swapped = json.loads(vocab)
    v = swapped["model"]["vocab"]
    v["a"], v["b"] = v["b"], v["a"]
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    b = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(swapped)))
    with pytest.raises(
        HarvestInputError, match=r"'m0' has ids \[\d+\] = \['a'\] and 'm1' has ids \[\d+\] = \['a'\]"
    ):
        check_tokenizers_agree([a, b], [{"id": "r", "text": "a"}], ["m0", "m1"])


def test_preflight_refuses_gemma_3n_before_any_weights_load(tmp_path):
    from transformers import Gemma3nTextConfig

    from jobs.harvest import preflight

    d = tmp_path / "g3n"
    Gemma3nTextConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, intermediate_size=[128, 128]
    ).save_pretrained(d)
    cfg = HarvestConfig.model_validate(
        dict(models=[{"name": "a", "path": str(d)}, {"name": "b", "path": str(d)}], layer=0,
             corpus={"uri": str(tmp_path / "c.jsonl")}, store=str(tmp_path / "s"))
    )  # fmt: skip
    with pytest.raises(HarvestInputError, match="'a' is a Gemma 3n.*cannot harvest it"):
        preflight(cfg, [{"id": "r", "text": "hi"}])


def _custom_code_model(tmp_path):
    """A local model whose architecture is its own code (auto_map), as hub repos without native
    transformers support ship."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path / "custom"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**_base())).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    (d / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'crossdiff_custom'\n"
    )
    (d / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    cfg = json.loads((d / "config.json").read_text())
    cfg |= {
        "model_type": "crossdiff_custom",
        "architectures": ["CustomForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
        },
    }
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def test_a_model_with_its_own_code_loads_only_when_the_config_trusts_it(tmp_path):
    from diffing.harvest import ModelSpec, unpinned_as_before
    from jobs.harvest import preflight

    path = _custom_code_model(tmp_path)
    hint = r"set models\[\]\.trust_remote_code: true"
    with pytest.raises(HarvestInputError, match=hint):
        load_model(path)
    model = load_model(path, trust_remote_code=True, keep_layers=2)
    assert type(model).__name__ == "CustomForCausalLM" and len(decoder_layers(model)) == 2

    def cfg(trust: bool) -> HarvestConfig:
        (tmp_path / "c.jsonl").write_text(json.dumps({"id": "r", "text": "Hello there."}) + "\n")
        return HarvestConfig.model_validate(
            dict(models=[{"name": n, "path": path, "trust_remote_code": trust} for n in "ab"], layer=1,
                 corpus={"uri": str(tmp_path / "c.jsonl")}, store=str(tmp_path / "s"), device="cpu",
                 context_length=32, outlier_norm_mult=None)
        )  # fmt: skip

    with pytest.raises(HarvestInputError, match=hint):  # before any worker starts
        preflight(cfg(False), [{"id": "r", "text": "Hello there."}])
    assert preflight(cfg(True), [{"id": "r", "text": "Hello there."}]) == 64
    out = Harvester(cfg(True)).run([{"id": "r", "text": "Hello there."}], 0)
    assert len(out["acts"]) > 0
    # unset, the field is not in any identity (harvests and runs made before it keep theirs)
    assert "trust_remote_code" not in unpinned_as_before(ModelSpec(name="a", path="p").model_dump())
    assert unpinned_as_before(ModelSpec(name="a", path="p", trust_remote_code=True).model_dump())[
        "trust_remote_code"
    ]


def test_a_missing_local_model_or_corpus_names_the_directory_it_was_looked_for_in(tmp_path, monkeypatch):
    """transformers calls a missing relative directory an invalid repo id: the message says what it is."""
    from diffing.corpus import CorpusSpec, read_corpus

    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        HarvestInputError,
        match=rf"no directory {tmp_path}/models/base on this machine; a relative path is read from {tmp_path}",
    ):
        load_model("./models/base")
    with pytest.raises(HarvestInputError, match=r"no directory /nope/base on this machine\)"):
        load_model("/nope/base")
    with pytest.raises(
        HarvestInputError, match=rf"corpus.jsonl does not exist \(a relative path is read from {tmp_path}\)"
    ):
        read_corpus(CorpusSpec(uri="corpus.jsonl"))


def test_the_splice_evaluation_batches_as_the_harvest_does(tmp_path):
    """ΔCE/KL of a LongRoPE pair do not depend on splice batch_size (a short prompt batched with a
    long one was read with the long one's positions)."""
    from diffing.config import CrosscoderConfig
    from diffing.crosscoder import Crosscoder
    from diffing.splice import splice_eval

    path = _build(tmp_path, "phi3_longrope")
    models = [load_model(path), load_model(path)]
    cfg = CrosscoderConfig(kind="l1", n_models=2, d_model=64, n_latents=128, model_names=("a", "b"), aux_k=4)
    cc = Crosscoder(cfg, seed=0)
    prompts = [byte_tokenizer()(t)["input_ids"] for t in TEXTS]
    one = splice_eval(models, cc, 1, prompts, batch_size=1)
    three = splice_eval(models, cc, 1, prompts, batch_size=3)
    for name in ("a", "b"):
        for k in ("delta_ce", "kl"):
            assert one["models"][name]["full"][k] == pytest.approx(
                three["models"][name]["full"][k], rel=1e-4
            ), k
