"""The torch engine's GPU paths. Their bookkeeping runs on CPU (packed mode forced on, graphs emulated);
tests that need CUDA skip with a reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankserve.engines.torch_engine import TorchEngine, TorchOptions
from rankserve.model.checkpoint import load_model
from rankserve.model.llama import Fp8Linear, padded_attention
from tests.unit.reference import max_abs_diff

PAD = 128001
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _batch(seed: int, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), max(lengths)), PAD, dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(0, 128000, n)
    return ids, np.asarray(lengths, dtype=np.int64)


def _engine(ckpt, device: str = "cpu", dtype: str = "auto", **options) -> TorchEngine:
    return TorchEngine.from_checkpoint(ckpt, device=device, dtype=dtype, options=TorchOptions(**options))


def test_options_from_env() -> None:
    env = {
        "RANKSERVE_TORCH_CUDA_GRAPHS": "1",
        "RANKSERVE_TORCH_GRAPH_MAX_TOKENS": "2048",
        "RANKSERVE_TORCH_ATTENTION": "sdpa",
        "RANKSERVE_TORCH_FP8": "off",
        "RANKSERVE_TORCH_PACKED": "",
    }
    opts = TorchOptions.from_env(env)
    assert opts == TorchOptions(cuda_graphs=True, graph_max_tokens=2048, attention="sdpa", fp8=False)
    assert TorchOptions.from_env({}) == TorchOptions()
    for bad in (
        {"RANKSERVE_TORCH_FP8": "maybe"},
        {"RANKSERVE_TORCH_ATTENTION": "flash"},
        {"RANKSERVE_TORCH_PACKED": "x"},
    ):
        with pytest.raises(ValueError, match="RANKSERVE_TORCH_"):
            TorchOptions.from_env(bad)


def test_cpu_default_runs_the_padded_reference(tiny_checkpoint) -> None:
    engine = _engine(tiny_checkpoint)
    assert not engine.packed and engine.info.precision == "float32" and engine.info.preferred_batch_tokens == 2048


def test_packed_engine_matches_padded_engine(tiny_checkpoint) -> None:
    padded, packed = _engine(tiny_checkpoint), _engine(tiny_checkpoint, packed="on")
    assert packed.packed and packed.attention == "sdpa"
    for seed, lengths in enumerate([[12], [40, 3, 17, 1], [64, 64]]):
        ids, lens = _batch(seed, lengths)
        a, b = padded.score(ids, lens), packed.score(ids, lens)
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (len(lengths),)
        assert np.abs(a - b).max() < 1e-4, (a, b)


def test_graph_bookkeeping_on_cpu(tiny_checkpoint) -> None:
    """The graph runner (emulated without CUDA: same static buffers, no capture) serves small batches from its
    buckets with the reference's logits; a batch over the largest bucket runs eagerly."""
    reference = _engine(tiny_checkpoint)
    engine = _engine(tiny_checkpoint, packed="on", graph_max_tokens=256, graph_step=64, graph_max_batch=4)
    engine.capture_graphs()
    runner = engine.graphs
    assert runner is not None and sorted(runner.buckets) == [64, 128, 192, 256]
    static_ptrs = {t: b.static.data_ptr() for t, b in runner.buckets.items()}
    for seed, lengths in enumerate([[5, 9], [60, 61, 2], [1], [100, 3, 7, 90]]):
        ids, lens = _batch(10 + seed, lengths)
        got = engine.score(ids, lens)
        assert np.abs(got - reference.score(ids, lens)).max() < 1e-4
    replays = {t: b.replays for t, b in runner.buckets.items()}
    assert replays == {64: 2, 128: 1, 192: 0, 256: 1}
    ids, lens = _batch(20, [200, 100])  # 300 tokens: no bucket
    assert np.abs(engine.score(ids, lens) - reference.score(ids, lens)).max() < 1e-4
    ids, lens = _batch(21, [3] * 5)  # more sequences than a graph's batch
    assert np.abs(engine.score(ids, lens) - reference.score(ids, lens)).max() < 1e-4
    assert {t: b.replays for t, b in runner.buckets.items()} == replays
    assert {t: b.static.data_ptr() for t, b in runner.buckets.items()} == static_ptrs  # buffers are reused


def test_warmup_captures_graphs_when_asked(tiny_checkpoint) -> None:
    engine = _engine(tiny_checkpoint, packed="on", cuda_graphs=True, graph_max_tokens=512, graph_step=256)
    assert engine.graphs is None
    engine.warmup()
    assert engine.graphs is not None and sorted(engine.graphs.buckets) == [256, 512]
    assert not engine.graphs.use_graphs  # no CUDA here: the same buffers, no capture
    plain = _engine(tiny_checkpoint, packed="on")
    plain.warmup()
    assert plain.graphs is None


def test_fp8_needs_hopper_or_ada(tiny_checkpoint) -> None:
    with pytest.raises(RuntimeError, match="FP8"):
        _engine(tiny_checkpoint, fp8=True)


def test_fp8_linear_is_close_to_the_float_product() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen) / 128**0.5
    x = torch.randn(37, 128, generator=gen)  # 37 rows: padded to a multiple of 16 inside
    lin = Fp8Linear(w, torch.float32)
    assert lin.weight_fp8.dtype == torch.float8_e4m3fn and lin.weight_scale.shape == (1, 64)
    got, want = lin(x), x @ w.T
    assert got.shape == (37, 64)
    rel = float((got - want).norm() / want.norm())
    assert 1e-4 < rel < 0.08, rel  # e4m3 has a 3-bit mantissa: a few per cent, never exact


def test_fp8_packed_forward_close_to_reference(tiny_checkpoint, tiny_model_fp32) -> None:
    model = load_model(tiny_checkpoint, dtype=torch.float32)
    model.prepare_fast_path(fp8=True)
    ids, lens = _batch(3, [20, 7, 33])
    from rankserve.engines.packing import pack

    p = pack(ids, lens)
    t = [torch.from_numpy(a) for a in (p.input_ids, p.positions, p.seq_ids, p.cu_seqlens)]
    with torch.inference_mode():
        attend = padded_attention(t[2], t[1], t[3].diff(), p.max_seqlen, gqa=False)
        got = model.forward_packed(*t, attend)
        want = tiny_model_fp32(torch.from_numpy(ids), torch.from_numpy(lens))
    diff = max_abs_diff(got, want)
    assert 0 < diff < 0.1 * float(want.abs().max()) + 0.05, (got, want)


# -- on a CUDA GPU ------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("options", [{}, {"attention": "sdpa"}, {"cuda_graphs": True, "graph_max_tokens": 512}])
def test_cuda_bf16_matches_cpu_fp32(tiny_checkpoint, options: dict) -> None:
    cpu = _engine(tiny_checkpoint)
    gpu = _engine(tiny_checkpoint, device="cuda", **options)
    assert gpu.packed and gpu.info.precision == "bfloat16"
    gpu.warmup()
    for seed, lengths in enumerate([[9], [300, 20, 77], [128] * 8, [1, 2, 3]]):
        ids, lens = _batch(seed, lengths)
        want = cpu.score(ids, lens)
        got = gpu.score(ids, lens)
        assert np.abs(got - want).max() < 0.05 * max(1.0, float(np.abs(want).max())), (got, want)


@needs_cuda
def test_cuda_fp8_close_to_bf16(tiny_checkpoint) -> None:
    from rankserve.engines.torch_engine import fp8_supported

    if not fp8_supported(torch.device("cuda")):
        pytest.skip("FP8 needs an Ada or Hopper GPU")
    bf16 = _engine(tiny_checkpoint, device="cuda")
    fp8 = _engine(tiny_checkpoint, device="cuda", fp8=True)
    ids, lens = _batch(5, [64, 200, 31])
    a, b = bf16.score(ids, lens), fp8.score(ids, lens)
    assert np.abs(a - b).max() < 0.1 * max(1.0, float(np.abs(a).max()))


def test_varlen_self_check_falls_back_to_sdpa(tiny_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the automatically chosen varlen kernel fails or disagrees with SDPA, the engine switches to SDPA."""
    import rankserve.engines.torch_engine as te

    engine = _engine(tiny_checkpoint, packed="on")
    engine.attention = "varlen"  # as on a GPU; on CPU the flash kernel raises
    assert engine.check_varlen() is False and engine.attention == "sdpa"

    def wrong(cu_seqlens, max_seqlen, n_heads, n_kv_heads, gqa=None):  # runs, but computes something else
        return lambda q, k, v: torch.zeros_like(q)

    monkeypatch.setattr(te, "varlen_attention", wrong)
    engine.attention = "varlen"
    assert engine.check_varlen() is False and engine.attention == "sdpa"

    def right(cu_seqlens, max_seqlen, n_heads, n_kv_heads, gqa=None):  # the SDPA path under another name
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        positions = torch.arange(len(seq_ids)) - cu_seqlens[:-1][seq_ids]
        return padded_attention(seq_ids, positions, lengths, max_seqlen, gqa=False)

    monkeypatch.setattr(te, "varlen_attention", right)
    engine.attention = "varlen"
    assert engine.check_varlen() is True and engine.attention == "varlen"
    ids, lens = _batch(30, [12, 50, 3])
    assert np.abs(engine.score(ids, lens) - _engine(tiny_checkpoint).score(ids, lens)).max() < 1e-4


def test_settings_reach_the_engine(tiny_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """The `torch_*` settings (flags or RANKSERVE_TORCH_* variables) become the engine's options."""
    from rankserve.engines import create_engine
    from rankserve.settings import Settings

    monkeypatch.setenv("RANKSERVE_TORCH_PACKED", "on")
    monkeypatch.setenv("RANKSERVE_TORCH_CUDA_GRAPHS", "true")
    settings = Settings(max_batch_size=16, torch_attention="sdpa")
    opts = TorchOptions.from_settings(settings)
    assert opts == TorchOptions(packed="on", attention="sdpa", cuda_graphs=True, graph_max_batch=16)
    engine = create_engine(tiny_checkpoint, backend="torch", device="cpu", dtype="auto", max_length=None, torch=opts)
    assert engine.packed and engine.options.graph_max_batch == 16
    with pytest.raises(ValueError):
        Settings(torch_attention="flash")
