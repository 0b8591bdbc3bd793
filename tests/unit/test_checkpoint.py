"""Checkpoint discovery and validation: every way a checkpoint can be wrong is a clear startup error.

Also the real model's size and, when RANKSERVE_REAL_CHECKPOINT names the real checkpoint, the model card's
published scores.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rankserve.errors import CheckpointError
from rankserve.model.checkpoint import MODEL_ID, load_model, open_checkpoint, resolve
from rankserve.model.config import RerankerConfig
from rankserve.model.synthetic import REAL_CONFIG, SIZES
from rankserve.ranker import PairEncoder, Truncate
from tests.unit.reference import model_logits

# Config validation ------------------------------------------------------------------------------------------------


def tiny_raw(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy({**REAL_CONFIG, **SIZES["tiny"]})
    for key, value in changes.items():
        if value is ...:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


def test_real_and_tiny_configs_are_valid() -> None:
    cfg = RerankerConfig.from_dict(copy.deepcopy(REAL_CONFIG))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        2048,
        16,
        32,
        8,
    )
    assert cfg.head_dim == 64 and cfg.vocab_size == 128256
    assert cfg.pooling == "avg" and cfg.temperature == 1.0 and cfg.num_labels == 1
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 32.0
    assert cfg.max_length == 8192  # max_position_embeddings 131072 clamped to the validated 8192
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (128000, 128001, 128001)
    assert RerankerConfig.from_dict(tiny_raw()).hidden_size == 64


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"hidden_size": ...}, "hidden_size"),
        ({"intermediate_size": ...}, "intermediate_size"),
        ({"vocab_size": None}, "vocab_size"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"hidden_size": True}, "hidden_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
        ({"model_type": "bert"}, "model_type"),
        ({"pooling": "max"}, "pooling"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"id2label": {"0": "NEG", "1": "POS"}}, "id2label"),
        ({"num_labels": 2}, "id2label"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads"),
        ({"head_dim": 15}, "head_dim"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_scaling": "llama3"}, "rope_scaling"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 32.0}}, "rope_scaling"),
        ({"rope_scaling": {"rope_type": "llama3", **REAL_CONFIG["rope_scaling"], "factor": "big"}}, "rope_scaling"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ],
)
def test_config_errors_name_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(CheckpointError) as info:
        RerankerConfig.from_dict(tiny_raw(**changes), source="ckpt/config.json")
    message = str(info.value)
    assert f"`{field}`" in message
    assert message.startswith("ckpt/config.json: ")
    assert "\n" not in message


def test_config_defaults_and_tolerated_fields() -> None:
    # Optional fields: old-style rope "type", head_dim derived, no pooling/temperature/id2label, eos as a list.
    raw = tiny_raw(head_dim=..., pooling=..., temperature=..., id2label=..., eos_token_id=[128001, 128009])
    raw["rope_scaling"] = {k if k != "rope_type" else "type": v for k, v in raw["rope_scaling"].items()}
    cfg = RerankerConfig.from_dict(raw)
    assert cfg.head_dim == 64 // 4
    assert cfg.pooling == "avg" and cfg.temperature == 1.0 and cfg.num_labels == 1
    assert cfg.eos_token_id == 128001
    assert cfg.rope_scaling is not None
    assert RerankerConfig.from_dict(tiny_raw(rope_scaling=None)).rope_scaling is None
    assert RerankerConfig.from_dict(tiny_raw(rope_scaling={"rope_type": "default"})).rope_scaling is None


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=re.escape("config.json")):
        RerankerConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        RerankerConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        RerankerConfig.from_file(tmp_path / "config.json")


def test_real_config_has_the_published_parameter_count() -> None:
    cfg = RerankerConfig.from_dict(copy.deepcopy(REAL_CONFIG))
    shapes = cfg.parameter_shapes()
    assert sum(int(np.prod(s)) for s in shapes.values()) == 1_235_816_448
    assert cfg.num_parameters() == 1_235_816_448
    assert len(shapes) == 1 + 16 * 9 + 2
    assert shapes["score.weight"] == (1, 2048)
    assert shapes["model.layers.15.self_attn.k_proj.weight"] == (512, 2048)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (2048, 8192)


# Tensors ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def ckpt_copy(tiny_checkpoint_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint, to break."""
    return Path(shutil.copytree(tiny_checkpoint_dir, tmp_path / "ckpt"))


def rewrite_weights(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(ckpt_copy: Path) -> None:
    rewrite_weights(ckpt_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks tensor `model\.layers\.1\.mlp\.up_proj\.weight`$"):
        open_checkpoint(str(ckpt_copy))


def test_missing_score_head_is_named(ckpt_copy: Path) -> None:
    # The classic "loaded the base model, the head is random" failure.
    rewrite_weights(ckpt_copy, lambda t: t.pop("score.weight"))
    with pytest.raises(CheckpointError, match=re.escape("`score.weight`")):
        open_checkpoint(str(ckpt_copy))


def test_several_missing_tensors_are_counted(ckpt_copy: Path) -> None:
    rewrite_weights(ckpt_copy, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.1.")])
    with pytest.raises(CheckpointError, match=r"lacks tensor `model\.layers\.1\.[a-z_.]+` \(and 8 more\)"):
        open_checkpoint(str(ckpt_copy))


def test_misshaped_tensor_is_named(ckpt_copy: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64, dtype=torch.bfloat16)

    rewrite_weights(ckpt_copy, edit)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(str(ckpt_copy))
    assert "`model.layers.0.self_attn.k_proj.weight`" in str(info.value)
    assert "[64, 64]" in str(info.value) and "[32, 64]" in str(info.value)


def test_unexpected_tensor_is_named(ckpt_copy: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(64, 64, dtype=torch.bfloat16)  # a 3rd layer

    rewrite_weights(ckpt_copy, edit)
    with pytest.raises(CheckpointError, match=r"unexpected tensor `model\.layers\.2\.self_attn\.q_proj\.weight`"):
        open_checkpoint(str(ckpt_copy))


def test_head_only_checkpoint_with_bias_is_rejected(ckpt_copy: Path) -> None:
    rewrite_weights(ckpt_copy, lambda t: t.__setitem__("score.bias", torch.zeros(1, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=re.escape("`score.bias`")):
        open_checkpoint(str(ckpt_copy))


def test_lm_head_and_inv_freq_are_ignored(ckpt_copy: Path, tiny_model_fp32, tiny_encoder) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t["lm_head.weight"] = torch.ones(128256, 64, dtype=torch.bfloat16)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        t["model.rotary_emb.inv_freq"] = torch.ones(8)

    rewrite_weights(ckpt_copy, edit)
    model = load_model(open_checkpoint(str(ckpt_copy)), dtype=torch.float32)
    assert "lm_head.weight" not in dict(model.named_parameters())
    seqs = [s.tolist() for s in tiny_encoder.encode("q", ["a passage", "another"], Truncate.END)]
    assert torch.equal(model_logits(model, seqs), model_logits(tiny_model_fp32, seqs))
    torch.testing.assert_close(model.inv_freq, tiny_model_fp32.inv_freq, rtol=0, atol=0)  # ones were not loaded


def test_unreadable_weight_file(ckpt_copy: Path) -> None:
    (ckpt_copy / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        open_checkpoint(str(ckpt_copy))


# Files and paths --------------------------------------------------------------------------------------------------


def test_pytorch_bin_only_directory(ckpt_copy: Path) -> None:
    (ckpt_copy / "model.safetensors").unlink()
    torch.save({"score.weight": torch.zeros(1, 64)}, ckpt_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(str(ckpt_copy))
    message = str(info.value)
    assert "pytorch_model.bin" in message and "safetensors" in message
    assert "save_pretrained" in message  # says how to convert


def test_no_weights_at_all(ckpt_copy: Path) -> None:
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"holds no model\.safetensors nor model\.safetensors\.index\.json"):
        open_checkpoint(str(ckpt_copy))


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    from rankserve.model.synthetic import write_checkpoint

    path = write_checkpoint(tmp_path / "sharded", "tiny", shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=re.escape("model-00002-of-00003.safetensors")):
        open_checkpoint(str(path))
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="weight_map"):
        open_checkpoint(str(path))


def test_tensor_stored_in_two_shards_is_named(tmp_path: Path) -> None:
    from rankserve.model.synthetic import write_checkpoint

    path = write_checkpoint(tmp_path / "sharded", "tiny", shards=2)
    second = path / "model-00002-of-00002.safetensors"
    tensors = load_file(second)
    tensors["model.embed_tokens.weight"] = load_file(path / "model-00001-of-00002.safetensors")[
        "model.embed_tokens.weight"
    ]
    save_file(tensors, str(second))
    with pytest.raises(CheckpointError, match=re.escape("tensor `model.embed_tokens.weight` is stored twice")):
        open_checkpoint(str(path))


def test_missing_tokenizer_json(ckpt_copy: Path) -> None:
    (ckpt_copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape("no tokenizer.json")):
        open_checkpoint(str(ckpt_copy))


def test_missing_config_json(ckpt_copy: Path) -> None:
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape("config.json")):
        open_checkpoint(str(ckpt_copy))


def test_nonexistent_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("./nope", "nope", "/nonexistent/dir/ckpt", "a/b/c"):
        with pytest.raises(CheckpointError) as info:
            open_checkpoint(name)
        message = str(info.value)
        assert message.startswith(f"Checkpoint directory {name} does not exist."), message
        assert MODEL_ID in message  # says what else may be passed


def test_a_file_instead_of_a_directory(ckpt_copy: Path) -> None:
    with pytest.raises(CheckpointError, match="is a file"):
        open_checkpoint(str(ckpt_copy / "config.json"))


def test_hub_id_offline_is_one_clear_paragraph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # An empty cache, so the result cannot depend on what this machine happens to have downloaded.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        resolve(MODEL_ID)
    err = info.value
    message = str(err)
    assert "\n" not in message and "Traceback" not in message
    assert MODEL_ID in message
    assert "HF_HUB_OFFLINE" in message
    # How to proceed: download elsewhere and pass the directory (the CLI's name is `hf` in huggingface_hub >= 1.0,
    # `huggingface-cli` before), or generate a test checkpoint.
    assert re.search(rf"download {re.escape(MODEL_ID)} --local-dir DIR`\) and pass that directory", message)
    assert "make_test_checkpoint.py" in message
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


# Loading ----------------------------------------------------------------------------------------------------------


def test_bf16_load(tiny_checkpoint) -> None:
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert set(params) == set(tiny_checkpoint.config.parameter_shapes())
    for name, p in params.items():
        assert p.dtype == torch.bfloat16, name
        assert not p.is_meta and p.device.type == "cpu", name
        assert not p.requires_grad, name
        assert tuple(p.shape) == tiny_checkpoint.config.parameter_shapes()[name]
    for name, b in model.named_buffers():
        assert not b.is_meta, name
    assert model.inv_freq.dtype == torch.float32  # RoPE tables stay fp32
    assert not model.training
    # The values are the file's (bf16 on disk: loading bf16 is exact).
    on_disk = load_file(str(tiny_checkpoint.weight_files[0]))
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "score.weight"):
        assert torch.equal(params[name], on_disk[name])


def test_fp32_load_is_exact(tiny_checkpoint, tiny_model_fp32) -> None:
    on_disk = load_file(str(tiny_checkpoint.weight_files[0]))
    for name, p in tiny_model_fp32.named_parameters():
        assert p.dtype == torch.float32 and not p.is_meta
        assert torch.equal(p, on_disk[name].float()), name


def test_checkpoint_metadata(tiny_checkpoint) -> None:
    assert tiny_checkpoint.config.random_weights
    assert tiny_checkpoint.weight_files == (tiny_checkpoint.path / "model.safetensors",)
    assert len(tiny_checkpoint.fingerprint) == 16


# The published scores (needs the real weights) --------------------------------------------------------------------

REAL_CHECKPOINT = os.environ.get("RANKSERVE_REAL_CHECKPOINT", "")
MODEL_CARD_QUERY = "how much protein should a female eat?"
MODEL_CARD_PASSAGES = [
    "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per day. "
    "But, as you can see from this chart, you'll need to increase that if you're expecting or training for a "
    "marathon. Check out the chart below to see how much protein you should be eating each day.",
    "Definition of summit for English Language Learners. : 1  the highest point of a mountain : the top of a "
    "mountain. : 2  the highest level. : 3  a meeting or series of meetings between the leaders of two or more "
    "governments.",
    "Calorie intake should not fall below 1,200 a day in women or 1,500 a day in men, except under the supervision "
    "of a health professional.",
]
MODEL_CARD_LOGITS = [20.6250, -23.1250, -0.2617]


def test_model_card_passages_are_verbatim() -> None:
    assert "1  the highest point" in MODEL_CARD_PASSAGES[1]
    assert "2  the highest level. : 3  a meeting" in MODEL_CARD_PASSAGES[1]
    assert all("  " not in p for p in (MODEL_CARD_PASSAGES[0], MODEL_CARD_PASSAGES[2]))


@pytest.mark.skipif(
    not REAL_CHECKPOINT,
    reason="set RANKSERVE_REAL_CHECKPOINT to a directory holding the real nvidia/llama-nemotron-rerank-1b-v2 "
    "checkpoint to check the model card's published scores",
)
def test_model_card_scores() -> None:
    from rankserve.engines.torch_engine import TorchEngine

    ckpt = open_checkpoint(REAL_CHECKPOINT)
    assert not ckpt.config.random_weights, "RANKSERVE_REAL_CHECKPOINT names a generated random-weight checkpoint"
    assert ckpt.config.num_parameters() == 1_235_816_448
    engine = TorchEngine.from_checkpoint(ckpt, device="auto", dtype="auto")
    encoder = PairEncoder.from_file(ckpt.tokenizer_file, ckpt.config.bos_token_id, 512)  # the card's max_length
    seqs = encoder.encode(MODEL_CARD_QUERY, MODEL_CARD_PASSAGES, Truncate.END)
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), ckpt.config.pad_token_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    logits = engine.score(ids, np.array([len(s) for s in seqs]))
    print(f"\nmodel card scores ({engine.info.device}, {engine.info.precision}): {logits.tolist()}")
    # The card's values are bf16 on CUDA; fp32 differs by ~0.125 near |logit| 20 (model.md).
    np.testing.assert_allclose(logits, MODEL_CARD_LOGITS, atol=0.2, rtol=0)
    assert np.argsort(-logits).tolist() == [0, 2, 1]
