"""The port-bug sentinels of model.md: each test fails if the classic bug were introduced.

Random weights make the scores meaningless but not arbitrary: the tiny checkpoint is fixed (seed 0), so each
bug moves its logits (or hidden states) by a deterministic amount, which must exceed the parity tolerance of
test_model_parity.py by a margin: the parity tests would then catch the bug.

Measured on the tiny checkpoint (max |Δlogit| between the bug and the correct model; logits are ~0.1..0.7):
  causal mask 0.23; last-token pooling 0.42; no BOS 4.6e-2; double BOS 4.3e-2; pair encoding 3e-2..0.16;
  no llama3 RoPE scaling: 2.8e-4 on short inputs (<= 48 tokens: the scaled low frequencies barely rotate over
  a few dozen positions; the final hidden states move by 1.5e-2 there), 1.6e-2 at 2048 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from rankserve.ranker import PairEncoder, Truncate, format_pair
from tests.unit.reference import Reference, max_abs_diff, model_logits, right_pad

BOS, EOS = 128000, 128001
PARITY_TOL = 1e-4  # test_model_parity.py

QUERY = "how much protein should a female eat?"
PASSAGES = [
    "Calorie intake should not fall below 1,200 a day in women or 1,500 a day in men, except under the "
    "supervision of a health professional.",
    "Definition of summit for English Language Learners. : 1  the highest point of a mountain : the top of a mountain.",
    "Protein is found in eggs, fish, lentils and tofu.",
    "No.",
]


def report(name: str, value: float) -> None:
    print(f"\n[sentinel] {name}: {value:.3e}")


@pytest.fixture(scope="module")
def seqs(tiny_encoder: PairEncoder) -> list[list[int]]:
    return [s.tolist() for s in tiny_encoder.encode(QUERY, PASSAGES, Truncate.END)]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_checkpoint.tokenizer_file))


def final_hidden(model, seq: list[int]) -> torch.Tensor:
    ids, lengths = right_pad([seq])
    with torch.no_grad():
        hidden, _ = model.hidden_states(ids, lengths)
    return hidden[0].float()


# (a) bidirectional attention ------------------------------------------------------------------------------------


def test_a_position_0_sees_later_tokens(tiny_model_fp32, seqs) -> None:
    seq = seqs[0]
    for pos in (len(seq) - 1, len(seq) // 2):
        changed = list(seq)
        changed[pos] = 1000 if seq[pos] != 1000 else 1001
        d = max_abs_diff(final_hidden(tiny_model_fp32, seq)[0], final_hidden(tiny_model_fp32, changed)[0])
        report(f"hidden[0] change when token {pos} changes", d)
        assert d > 100 * PARITY_TOL, "position 0 ignores later tokens: is the attention causal?"


def test_a_the_check_itself_detects_a_causal_model(tiny_reference, seqs, tiny_checkpoint_dir) -> None:
    # The same measurement on a causal model gives exactly no change: the check above is a real sentinel.
    causal = Reference(tiny_checkpoint_dir, causal=True)
    seq = seqs[0]
    changed = [*seq[:-1], 1000 if seq[-1] != 1000 else 1001]
    h1, _ = causal.hidden_states([seq])
    h2, _ = causal.hidden_states([changed])
    assert max_abs_diff(h1[0, 0], h2[0, 0]) == 0.0
    h1, _ = tiny_reference.hidden_states([seq])
    h2, _ = tiny_reference.hidden_states([changed])
    assert max_abs_diff(h1[0, 0], h2[0, 0]) > 100 * PARITY_TOL


def test_a_padding_keys_are_hidden(tiny_model_fp32, seqs) -> None:
    # The other half of the mask: what sits in the padding (any token id) never reaches a real token.
    ids, lengths = right_pad(seqs, pad_token_id=EOS)
    other = ids.clone()
    for i, n in enumerate(lengths.tolist()):
        other[i, n:] = 42
    with torch.no_grad():
        h1, mask = tiny_model_fp32.hidden_states(ids, lengths)
        h2, _ = tiny_model_fp32.hidden_states(other, lengths)
        assert torch.isfinite(h1).all()  # padded query rows attend to real keys: no NaN rows
        assert torch.equal(h1[mask], h2[mask])
        assert torch.equal(tiny_model_fp32(ids, lengths), tiny_model_fp32(other, lengths))


# (b) a causal reference differs ---------------------------------------------------------------------------------


def test_b_causal_mask_would_fail_parity(tiny_model_fp32, tiny_checkpoint_dir, seqs) -> None:
    causal = Reference(tiny_checkpoint_dir, causal=True)
    d = max_abs_diff(model_logits(tiny_model_fp32, seqs), causal.logits(seqs))
    report("causal reference vs ours, max |Δlogit|", d)
    assert d > 100 * PARITY_TOL


# (c) last-token pooling differs ---------------------------------------------------------------------------------


def test_c_last_token_pooling_would_fail_parity(tiny_model_fp32, tiny_checkpoint_dir, seqs) -> None:
    last = Reference(tiny_checkpoint_dir, pooling="last")
    d = max_abs_diff(model_logits(tiny_model_fp32, seqs), last.logits(seqs))
    report("last-token pooling vs ours, max |Δlogit|", d)
    assert d > 100 * PARITY_TOL
    cls = Reference(tiny_checkpoint_dir, pooling="cls")
    assert max_abs_diff(model_logits(tiny_model_fp32, seqs), cls.logits(seqs)) > 100 * PARITY_TOL


# (d) missing llama3 RoPE scaling differs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unscaled(tiny_checkpoint_dir: Path) -> Reference:
    return Reference(tiny_checkpoint_dir, rope_scaling=False)


def test_d_missing_rope_scaling_short(tiny_model_fp32, unscaled, seqs) -> None:
    assert not torch.allclose(unscaled.rope_inv_freq(), tiny_model_fp32.inv_freq)
    d_logit = max_abs_diff(model_logits(tiny_model_fp32, seqs), unscaled.logits(seqs))
    ids, lengths = right_pad(seqs)
    with torch.no_grad():
        ours, _ = tiny_model_fp32.hidden_states(ids, lengths)
    ref, _ = unscaled.hidden_states(seqs)
    w = ref.shape[1]
    d_hidden = max(max_abs_diff(ours[i, : len(s)], ref[i, w - len(s) :]) for i, s in enumerate(seqs))
    report(f"no llama3 scaling, short ({max(map(len, seqs))} tokens), max |Δlogit|", d_logit)
    report("no llama3 scaling, short, max |Δhidden|", d_hidden)
    # At a few dozen positions the scaled (low) frequencies barely rotate: the logits move only a little,
    # still beyond the parity tolerance; the hidden states, which the parity tests compare too, move clearly.
    assert d_logit > PARITY_TOL
    assert d_hidden > 10 * PARITY_TOL


def test_d_missing_rope_scaling_long(tiny_model_fp32, unscaled, tiny_checkpoint) -> None:
    encoder = PairEncoder.from_file(tiny_checkpoint.tokenizer_file, BOS, 2048)
    passage = " ".join(f"Item {i}: protein, calories, grams per day, {i * 7 % 13} servings." for i in range(400))
    seq = encoder.encode(QUERY, [passage], Truncate.END)[0].tolist()
    assert len(seq) == 2048
    d = max_abs_diff(model_logits(tiny_model_fp32, [seq]), unscaled.logits([seq]))
    report("no llama3 scaling, 2048 tokens, max |Δlogit|", d)
    assert d > 10 * PARITY_TOL


# (e) exactly one BOS, no EOS ------------------------------------------------------------------------------------


def test_e_one_bos_no_eos(tiny_encoder, tokenizer, seqs) -> None:
    # The checkpoint's tokenizer.json (like Llama-3.2's) adds BOS itself: the encoder must not double it.
    assert tokenizer.encode("hello").ids[0] == BOS
    for s in seqs:
        assert s[0] == BOS
        assert s.count(BOS) == 1
        assert EOS not in s


def test_e_dropping_or_doubling_bos_changes_the_logit(tiny_model_fp32, seqs) -> None:
    ours = model_logits(tiny_model_fp32, seqs)
    no_bos = model_logits(tiny_model_fp32, [s[1:] for s in seqs])
    two_bos = model_logits(tiny_model_fp32, [[BOS, *s] for s in seqs])
    with_eos = model_logits(tiny_model_fp32, [[*s, EOS] for s in seqs])
    for name, other in (("no BOS", no_bos), ("double BOS", two_bos), ("trailing EOS", with_eos)):
        d = max_abs_diff(ours, other)
        report(f"{name} vs ours, max |Δlogit|", d)
        assert d > 10 * PARITY_TOL


# (f) one sequence, not a text pair ------------------------------------------------------------------------------


def test_f_pair_encoding_differs(tiny_model_fp32, tiny_encoder, tokenizer) -> None:
    for passage in PASSAGES:
        ours = tiny_encoder.encode(QUERY, [passage], Truncate.END)[0].tolist()
        single = tokenizer.encode(format_pair(QUERY, passage), add_special_tokens=False).ids
        assert ours == [BOS, *single]
        # The broken ports: the two halves as a text pair (with or without the tokenizer's special tokens).
        pair = tokenizer.encode(f"question:{QUERY}", f"passage:{passage}").ids
        pair_raw = tokenizer.encode(f"question:{QUERY}", f"passage:{passage}", add_special_tokens=False).ids
        assert pair != ours
        assert [BOS, *pair_raw] != ours
        d = max_abs_diff(model_logits(tiny_model_fp32, [ours]), model_logits(tiny_model_fp32, [pair]))
        report("pair-encoded vs ours, |Δlogit|", d)
        assert d > 10 * PARITY_TOL


# (g) the template ------------------------------------------------------------------------------------------------


def test_g_template_has_real_newlines() -> None:
    text = format_pair("q", "p")
    assert text == "question:q \n \n passage:p"
    assert "\\" not in text
    assert text.count("\n") == 2
    assert format_pair("", "") == "question: \n \n passage:"


def test_g_template_tokens(tokenizer) -> None:
    # The separator tokenizes to newline tokens, not to a backslash and an "n".
    ids = tokenizer.encode(format_pair("q", "p"), add_special_tokens=False).ids
    assert "\n" in tokenizer.decode(ids)
    assert tokenizer.decode(ids) == "question:q \n \n passage:p"
    literal = tokenizer.encode("question:q \\n \\n passage:p", add_special_tokens=False).ids
    assert literal != ids


# Post-processor independence --------------------------------------------------------------------------------------


def _tokenizer_variants(tokenizer_file: Path, out: Path) -> dict[str, Path]:
    variants = {"as shipped (adds BOS)": tokenizer_file}
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A <|end_of_text|>",
        pair="<|begin_of_text|> $A <|end_of_text|> <|begin_of_text|> $B:1 <|end_of_text|>:1",
        special_tokens=[("<|begin_of_text|>", BOS), ("<|end_of_text|>", EOS)],
    )
    path = out / "bos_eos.json"
    tok.save(str(path))
    variants["BOS+EOS"] = path
    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    data["post_processor"] = None
    path = out / "none.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    variants["no post-processor"] = path
    return variants


def test_post_processor_does_not_matter(tiny_checkpoint, tmp_path: Path) -> None:
    variants = _tokenizer_variants(tiny_checkpoint.tokenizer_file, tmp_path)
    expected_specials = {"as shipped (adds BOS)": [BOS], "BOS+EOS": [BOS, EOS], "no post-processor": []}
    passages = [*PASSAGES, "蛋白质 🥚", ""]
    results = {}
    for name, path in variants.items():
        tok = Tokenizer.from_file(str(path))  # loading the 128k-token BPE takes ~0.5 s: once per variant
        # Each variant really behaves differently when asked for special tokens...
        ids, plain = tok.encode("hello").ids, tok.encode("hello", add_special_tokens=False).ids
        assert [i for i in ids if i not in plain] == expected_specials[name], name
        # ...and the encoder's ids are the same for all of them.
        encoder = PairEncoder(tok, BOS, 8192)
        for truncate in (Truncate.NONE, Truncate.END):
            results[name, truncate] = [s.tolist() for s in encoder.encode(QUERY, passages, truncate)]
        short = PairEncoder(tok, BOS, 12)
        results[name, "short"] = [s.tolist() for s in short.encode(QUERY, passages, Truncate.END)]
    first = results["as shipped (adds BOS)", Truncate.NONE]
    for key, value in results.items():
        if key[1] != "short":
            assert value == first, key
        else:
            assert value == [s[:12] for s in first], key
    for s in first:
        assert s[0] == BOS and s.count(BOS) == 1 and EOS not in s
