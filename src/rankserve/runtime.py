"""Builds the layers from settings: checkpoint → engine → scheduler → ranker. Shared by the server and the CLI."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from rankserve.cache import ScoreCache
from rankserve.engines import Engine, create_engine
from rankserve.model.checkpoint import MODEL_ALIASES, MODEL_ID, Checkpoint, open_checkpoint
from rankserve.ranker import LongDocuments, PairEncoder, Ranker
from rankserve.scheduler import BatchPolicy, BatchStats, Scheduler
from rankserve.settings import Settings

log = logging.getLogger(__name__)

EngineFactory = Callable[[Checkpoint, Settings], Engine]


def default_engine_factory(ckpt: Checkpoint, settings: Settings) -> Engine:
    if settings.cpu_threads:
        import torch

        torch.set_num_threads(settings.cpu_threads)
    from rankserve.tensorrt.auto import TensorRTOptions

    tensorrt = TensorRTOptions(
        engine_dir=settings.tensorrt_engine,
        cache_dir=settings.engine_cache_dir,
        build=settings.tensorrt_build,
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_seq_length=settings.max_seq_length,
    )
    from rankserve.engines.onnxruntime_engine import OnnxRuntimeOptions
    from rankserve.engines.torch_options import TorchOptions

    onnxruntime = OnnxRuntimeOptions(
        cache_dir=settings.onnx_cache_dir,
        int8=settings.onnx_int8,
        save_optimized=settings.onnx_save_optimized,
        threads=settings.cpu_threads,
    )
    return create_engine(
        ckpt,
        backend=settings.backend,
        device=settings.device,
        dtype=settings.dtype,
        max_length=settings.max_seq_length,
        tensorrt=tensorrt,
        onnxruntime=onnxruntime,
        torch=TorchOptions.from_settings(settings),
    )


def model_ids(settings: Settings) -> list[str]:
    """Every id a request may name; the first is the one we list first and answer with."""
    ids = [*settings.served_model_name, MODEL_ID, *MODEL_ALIASES]
    return list(dict.fromkeys(ids))


def batch_policy(settings: Settings, engine: Engine) -> BatchPolicy:
    info = engine.info
    budget = settings.max_batch_tokens or info.preferred_batch_tokens
    return BatchPolicy(  # within the engine's hard limits (TensorRT profiles), whatever the settings say
        max_batch_size=min(settings.max_batch_size, info.max_batch_size or settings.max_batch_size),
        max_batch_tokens=min(budget, info.max_batch_tokens or budget),
        max_queue_tokens=settings.max_queue_tokens,
        lookahead=settings.batch_lookahead,
        min_fill=settings.min_batch_fill,
    )


def long_documents(settings: Settings) -> LongDocuments:
    return LongDocuments(
        mode=settings.long_documents, overlap=settings.window_overlap, max_windows=settings.max_windows_per_request
    )


@dataclass
class Runtime:
    settings: Settings
    checkpoint: Checkpoint
    engine: Engine
    encoder: PairEncoder
    scheduler: Scheduler
    ranker: Ranker

    @classmethod
    def load(
        cls,
        settings: Settings,
        checkpoint: Checkpoint | None = None,
        engine_factory: EngineFactory | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> Runtime:
        """The slow part of start-up (load weights, warm up). Blocking: run it off the event loop."""
        ckpt = checkpoint or open_checkpoint(settings.model)
        if ckpt.config.random_weights:
            log.warning("%s holds RANDOM test weights: its scores are meaningless (not a model)", ckpt.path)
        started = time.perf_counter()
        engine = (engine_factory or default_engine_factory)(ckpt, settings)
        log.info(
            "loaded %s on %s (%s, %s) in %.1fs",
            ckpt.path,
            engine.info.device,
            engine.info.backend,
            engine.info.precision,
            time.perf_counter() - started,
        )
        if settings.warmup:
            started = time.perf_counter()
            engine.warmup()
            log.info("warm-up done in %.1fs", time.perf_counter() - started)
        max_length = min(settings.max_seq_length, engine.info.max_length)
        encoder = PairEncoder.from_file(ckpt.tokenizer_file, ckpt.config.bos_token_id, max_length)
        scheduler = Scheduler(engine, batch_policy(settings, engine), on_batch=on_batch)
        # The cache is this runtime's own: its keys carry this checkpoint's fingerprint.
        cache = ScoreCache(settings.score_cache_size) if settings.score_cache_size else None
        ranker = Ranker(
            encoder,
            scheduler,
            long_documents=long_documents(settings),
            cache=cache,
            fingerprint=ckpt.fingerprint if cache is not None else "",
        )
        return cls(settings, ckpt, engine, encoder, scheduler, ranker)
