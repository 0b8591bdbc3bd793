"""rankserve's model against an independent reference built from transformers' LlamaModel (reference.py).

All on the tiny checkpoint (seeded random weights in the real format) on CPU. The reference left-pads and
positions padding too (like the model card's code); rankserve right-pads: agreement checks the layers, the
masking and the RoPE positions together.

Measured on CPU (torch 2.13, transformers 5.24, 2 cores; each test prints its numbers, `pytest -s` shows them):
  fp32 vs reference, mixed-length batch (6 pairs, 14..109 tokens) ... max |Δlogit| 6.0e-8, max |Δhidden| 1.8e-6
  fp32 vs reference, multilingual (8 pairs) ......................... max |Δlogit| 8.9e-8
  fp32 vs reference, one 4096-token sequence ........................ max |Δlogit| 3.0e-8
  padded batch vs one at a time (14 pairs) .......................... max |Δlogit| 1.2e-7 (4096 + short: 1.0e-7)
  TorchEngine.score vs reference .................................... max |Δlogit| 6.0e-8
  pooling "cls" / "last" vs reference ............................... max |Δlogit| 3.6e-7
  bf16 vs fp32 (rankserve on CPU; tiny logits are |x| <= 0.65) ....... max |Δlogit| 2.2e-3
  sharded (3 files) vs single file .................................. bit-identical
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rankserve.engines.torch_engine import TorchEngine
from rankserve.model.checkpoint import load_model, open_checkpoint
from rankserve.model.synthetic import write_checkpoint
from rankserve.ranker import PairEncoder, Truncate
from tests.unit.reference import Reference, max_abs_diff, model_logits, right_pad

# fp32 logits and final hidden states: rankserve vs the transformers reference.
PARITY_TOL = 1e-4
# The same model on a padded batch vs one sequence at a time.
BATCH_TOL = 1e-5
# bf16 weights and matmuls vs fp32 (model.md: ~0.02 near 0 on the real model); measured ~2e-3 on tiny.
BF16_TOL = 2e-2

QUERY = "how much protein should a female eat?"
PASSAGES = [
    "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per "
    "day. But, as you can see from this chart, you'll need to increase that if you're expecting or training for "
    "a marathon. Check out the chart below to see how much protein you should be eating each day.",
    "Definition of summit for English Language Learners. : 1  the highest point of a mountain : the top of a "
    "mountain. : 2  the highest level. : 3  a meeting or series of meetings between the leaders of two or more "
    "governments.",
    "Calorie intake should not fall below 1,200 a day in women or 1,500 a day in men, except under the "
    "supervision of a health professional.",
    "Protein.",
    "x",
    "Eggs, lentils, tofu and fish are good sources of protein; the recommended dietary allowance is 0.8 grams "
    "per kilogram of body weight. " * 3,
]
MULTILINGUAL = [
    ("蛋白质的每日推荐摄入量是多少？", "成年女性每天大约需要46克蛋白质，孕期和运动时需要更多。"),
    ("タンパク質はどれくらい必要ですか", "一般的に成人女性は一日に約50グラムのタンパク質が必要です。"),
    ("كم من البروتين يجب أن تأكل المرأة؟", "تحتاج المرأة البالغة إلى حوالي ستة وأربعين غراما من البروتين يوميا."),
    ("एक महिला को कितना प्रोटीन खाना चाहिए?", "वयस्क महिलाओं को प्रतिदिन लगभग 46 ग्राम प्रोटीन की आवश्यकता होती है।"),
    ("protein 💪🥚🍗?", "🥩🥦 High-protein meals 🏋️‍♀️ for athletes 👩🏽‍🔬 and everyone else 🎉"),
    ("Сколько белка нужно женщине?", "Взрослой женщине нужно около 46 граммов белка в день."),
    ("Wie viel Eiweiß sollte eine Frau essen?", "Die Deutsche Gesellschaft für Ernährung empfiehlt 0,8 g pro kg."),
    ("한국어 질문", "단백질은 근육을 만드는 데 필요합니다."),
]


def report(name: str, value: float) -> None:
    print(f"\n[parity] {name}: {value:.3e}")


def encode(encoder: PairEncoder, query: str, passages: list[str]) -> list[list[int]]:
    return [s.tolist() for s in encoder.encode(query, passages, Truncate.END)]


def hidden_diff(model: torch.nn.Module, reference: Reference, seqs: list[list[int]]) -> float:
    """Max |Δ| of the final hidden states of every real token (ours right-padded, reference left-padded)."""
    ids, lengths = right_pad(seqs)
    with torch.no_grad():
        ours, _ = model.hidden_states(ids, lengths)
    ref, _ = reference.hidden_states(seqs)
    width = ref.shape[1]
    return max(max_abs_diff(ours[i, : len(s)], ref[i, width - len(s) :]) for i, s in enumerate(seqs))


def long_text(n_words: int = 5000) -> str:
    """Real-looking text, deterministic, no short period (shuffled words of varied sentences)."""
    words = (" ".join(PASSAGES) + " " + " ".join(q + " " + p for q, p in MULTILINGUAL)).split()
    rng = random.Random(1234)
    return " ".join(rng.choice(words) for _ in range(n_words))


# ---------------------------------------------------------------------------------------------------------------


def test_reference_applies_llama3_rope_scaling(tiny_reference: Reference, tiny_model_fp32) -> None:
    # Guard for the reference itself: transformers must have read rope_scaling (else parity proves nothing).
    assert tiny_reference.config.rope_parameters["rope_type"] == "llama3"
    default = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert not torch.allclose(tiny_reference.rope_inv_freq(), default)
    torch.testing.assert_close(tiny_model_fp32.inv_freq, tiny_reference.rope_inv_freq(), rtol=1e-6, atol=0)


def test_mixed_length_batch_matches_reference(tiny_model_fp32, tiny_reference, tiny_encoder) -> None:
    seqs = encode(tiny_encoder, QUERY, PASSAGES)
    assert len({len(s) for s in seqs}) == len(seqs)  # really mixed lengths
    ours, ref = model_logits(tiny_model_fp32, seqs), tiny_reference.logits(seqs)
    d_logit, d_hidden = max_abs_diff(ours, ref), hidden_diff(tiny_model_fp32, tiny_reference, seqs)
    report("fp32 vs reference, mixed-length batch, max |Δlogit|", d_logit)  # measured 6e-8
    report("fp32 vs reference, mixed-length batch, max |Δhidden|", d_hidden)  # measured ~1e-6
    assert d_logit <= PARITY_TOL
    assert d_hidden <= PARITY_TOL
    # Not a degenerate model: the logits of different passages differ.
    assert float(ours.max() - ours.min()) > 100 * PARITY_TOL


def test_multilingual_matches_reference(tiny_model_fp32, tiny_reference, tiny_encoder) -> None:
    seqs = [encode(tiny_encoder, q, [p])[0] for q, p in MULTILINGUAL]
    ours, ref = model_logits(tiny_model_fp32, seqs), tiny_reference.logits(seqs)
    d = max_abs_diff(ours, ref)
    report("fp32 vs reference, multilingual, max |Δlogit|", d)
    assert d <= PARITY_TOL
    assert hidden_diff(tiny_model_fp32, tiny_reference, seqs) <= PARITY_TOL


@pytest.mark.slow  # ~5 s alone (the eager reference at 4096 tokens); more on a busy machine
def test_long_sequence_matches_reference(tiny_model_fp32, tiny_reference, tiny_checkpoint, tiny_encoder) -> None:
    # 4096 tokens: beyond the short-sequence regime, where positions reach the llama3-scaled RoPE frequencies.
    encoder = PairEncoder.from_file(tiny_checkpoint.tokenizer_file, 128000, 4096)
    seq = encoder.encode(QUERY, [long_text()], Truncate.END)[0].tolist()
    assert len(seq) == 4096
    d = max_abs_diff(model_logits(tiny_model_fp32, [seq]), tiny_reference.logits([seq]))
    report("fp32 vs reference, 4096 tokens, max |Δlogit|", d)
    assert d <= PARITY_TOL
    # A long sequence padded next to a short one (mostly padding in the short row) changes nothing.
    short = encode(tiny_encoder, QUERY, ["x"])[0]
    batch = model_logits(tiny_model_fp32, [seq, short])
    single = torch.cat([model_logits(tiny_model_fp32, [seq]), model_logits(tiny_model_fp32, [short])])
    d = max_abs_diff(batch, single)
    report("4096 + short padded batch vs one at a time, max |Δlogit|", d)
    assert d <= BATCH_TOL


def test_padded_batch_equals_one_at_a_time(tiny_model_fp32, tiny_encoder) -> None:
    seqs = encode(tiny_encoder, QUERY, PASSAGES) + [encode(tiny_encoder, q, [p])[0] for q, p in MULTILINGUAL]
    batch = model_logits(tiny_model_fp32, seqs)
    single = torch.cat([model_logits(tiny_model_fp32, [s]) for s in seqs])
    d = max_abs_diff(batch, single)
    report("padded batch vs one at a time, max |Δlogit|", d)
    assert d <= BATCH_TOL
    # The batch order does not matter either.
    perm = list(reversed(range(len(seqs))))
    d = max_abs_diff(model_logits(tiny_model_fp32, [seqs[i] for i in perm]), batch[perm])
    assert d <= BATCH_TOL


def test_sharded_checkpoint_gives_identical_logits(tmp_path: Path, tiny_model_fp32, tiny_encoder) -> None:
    sharded = open_checkpoint(str(write_checkpoint(tmp_path / "sharded", "tiny", seed=0, shards=3)))
    assert len(sharded.weight_files) == 3
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    model = load_model(sharded, dtype=torch.float32)
    seqs = encode(tiny_encoder, QUERY, PASSAGES)
    assert torch.equal(model_logits(model, seqs), model_logits(tiny_model_fp32, seqs))


def test_torch_engine_score_path(tiny_checkpoint, tiny_model_fp32, tiny_reference, tiny_encoder) -> None:
    engine = TorchEngine.from_checkpoint(tiny_checkpoint, device="cpu", dtype="float32")
    assert engine.info.precision == "float32"
    assert engine.info.max_length == 8192
    assert engine.info.pad_token_id == 128001
    engine.warmup()
    arrays = tiny_encoder.encode(QUERY, PASSAGES, Truncate.END)  # int32, as the scheduler gets them
    width = max(len(a) for a in arrays)
    ids = np.full((len(arrays), width), engine.info.pad_token_id, dtype=np.int32)
    for i, a in enumerate(arrays):
        ids[i, : len(a)] = a
    lengths = np.array([len(a) for a in arrays], dtype=np.int32)
    out = engine.score(ids, lengths)
    assert out.dtype == np.float32 and out.shape == (len(arrays),)
    seqs = [a.tolist() for a in arrays]
    assert np.array_equal(out, model_logits(tiny_model_fp32, seqs).numpy())
    d = max_abs_diff(torch.from_numpy(out), tiny_reference.logits(seqs))
    report("TorchEngine.score vs reference, max |Δlogit|", d)
    assert d <= PARITY_TOL


def test_bf16_agrees_with_fp32(tiny_checkpoint, tiny_model_fp32, tiny_encoder) -> None:
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    seqs = encode(tiny_encoder, QUERY, PASSAGES) + [encode(tiny_encoder, q, [p])[0] for q, p in MULTILINGUAL]
    bf16, fp32 = model_logits(model, seqs), model_logits(tiny_model_fp32, seqs)
    assert bf16.dtype == torch.float32  # logits are fp32 whatever the weights
    d = max_abs_diff(bf16, fp32)
    report("bf16 vs fp32 (CPU), max |Δlogit|", d)  # measured ~2e-3
    report("fp32 max |logit|", float(fp32.abs().max()))
    assert d <= BF16_TOL
    assert d > 0  # it really ran in bf16
    # The ranking is what users see: bf16 keeps the fp32 order where the fp32 logits are well apart.
    order32 = torch.argsort(fp32, descending=True).tolist()
    gaps = [float(fp32[a] - fp32[b]) for a, b in itertools.pairwise(order32)]
    order16 = torch.argsort(bf16, descending=True).tolist()
    for k, gap in enumerate(gaps):
        if gap > 2 * BF16_TOL:
            assert set(order16[: k + 1]) == set(order32[: k + 1])


@pytest.fixture(scope="module")
def edited_checkpoints(tiny_checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Copies of the tiny checkpoint whose config.json says pooling "cls" / "last", or temperature 2."""
    out = {}
    for name, edit in (("cls", {"pooling": "cls"}), ("last", {"pooling": "last"}), ("t2", {"temperature": 2.0})):
        d = tmp_path_factory.mktemp(f"edited-{name}") / "ckpt"
        shutil.copytree(tiny_checkpoint_dir, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg |= edit
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        out[name] = d
    return out


@pytest.mark.parametrize("pooling", ["cls", "last"])
def test_other_poolings_match_reference(pooling: str, edited_checkpoints, tiny_encoder, tiny_model_fp32) -> None:
    ckpt = open_checkpoint(str(edited_checkpoints[pooling]))
    assert ckpt.config.pooling == pooling
    model = load_model(ckpt, dtype=torch.float32)
    reference = Reference(edited_checkpoints[pooling])
    assert reference.pooling == pooling
    seqs = encode(tiny_encoder, QUERY, PASSAGES)
    ours = model_logits(model, seqs)
    d = max_abs_diff(ours, reference.logits(seqs))
    report(f"pooling {pooling!r} vs reference, max |Δlogit|", d)
    assert d <= PARITY_TOL
    # The config field really changed the pooling.
    assert max_abs_diff(ours, model_logits(tiny_model_fp32, seqs)) > 100 * PARITY_TOL


def test_temperature_divides_the_logit(edited_checkpoints, tiny_encoder, tiny_model_fp32) -> None:
    ckpt = open_checkpoint(str(edited_checkpoints["t2"]))
    assert ckpt.config.temperature == 2.0
    seqs = encode(tiny_encoder, QUERY, PASSAGES)
    ours = model_logits(load_model(ckpt, dtype=torch.float32), seqs)
    assert max_abs_diff(ours, Reference(edited_checkpoints["t2"]).logits(seqs)) <= PARITY_TOL
    torch.testing.assert_close(ours * 2, model_logits(tiny_model_fp32, seqs), rtol=1e-6, atol=1e-7)
