#!/usr/bin/env python3
"""The baseline for `bench_serving.py`: how a user would serve the reranker without rankserve.

A plain FastAPI/uvicorn app with the same `/v1/ranking` JSON shape, the same model code and weights
(`rankserve.model.checkpoint.load_model`, float32 as rankserve uses on CPU) and the same tokenization
(`rankserve.ranker.PairEncoder`), so the only difference measured is the serving layer:

- per request, ONE forward pass over all its passages, right-padded to the longest one (the Hugging Face
  `tokenizer(..., padding=True)` + `model(**batch)` pattern): no length sorting, no bucketing;
- no cross-request batching: requests run one at a time, either under a global lock in FastAPI's
  thread pool (`--mode lock`, the default: a sync `def` route, as FastAPI's docs suggest for blocking work)
  or directly in the event-loop thread (`--mode loop`: an `async def` route that calls the model).

    python scripts/naive_server.py --model checkpoints/mid --port 8001

Not a product: no limits, no metrics, no auth. Loopback use in benchmarks only.
"""

from __future__ import annotations

import argparse
import logging
import threading
from typing import Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from rankserve.errors import RankserveError
from rankserve.model.checkpoint import load_model as load_reranker
from rankserve.model.checkpoint import open_checkpoint
from rankserve.ranker import PairEncoder, Truncate, sort_rankings

log = logging.getLogger("naive_server")


class TextItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str = Field(min_length=1)


class RankingRequest(BaseModel):
    model: str | None = None
    query: TextItem
    passages: list[TextItem] = Field(min_length=1)
    truncate: str = "NONE"


class NaiveRanker:
    def __init__(self, model_dir: str, max_length: int | None) -> None:
        ckpt = open_checkpoint(model_dir)
        self.model = load_reranker(ckpt, dtype=torch.float32)
        self.pad_id = ckpt.config.pad_token_id
        limit = min(max_length or ckpt.config.max_length, ckpt.config.max_length)
        self.encoder = PairEncoder.from_file(ckpt.tokenizer_file, ckpt.config.bos_token_id, limit)
        self.lock = threading.Lock()

    @torch.inference_mode()
    def rank(self, req: RankingRequest) -> dict[str, Any]:
        seqs = self.encoder.encode(req.query.text, [p.text for p in req.passages], Truncate(req.truncate))
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        ids = np.full((len(seqs), int(lengths.max())), self.pad_id, dtype=np.int64)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = s
        logits = self.model(torch.from_numpy(ids), torch.from_numpy(lengths)).float().numpy()
        tokens = int(lengths.sum())
        return {
            "rankings": [{"index": r.index, "logit": r.logit} for r in sort_rankings(logits)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def create_app(ranker: NaiveRanker, mode: str) -> FastAPI:
    app = FastAPI(title="naive reranker")

    @app.exception_handler(RankserveError)
    async def _error(_request: Any, exc: RankserveError) -> JSONResponse:
        return JSONResponse({"error": exc.message, "detail": exc.message}, status_code=422)

    @app.get("/v1/health/ready")
    async def ready() -> dict[str, str]:
        return {"object": "health.response", "message": "Service is ready.", "status": "ready"}

    if mode == "loop":

        @app.post("/v1/ranking")
        async def ranking_loop(body: RankingRequest) -> dict[str, Any]:
            return ranker.rank(body)  # blocks the event loop for the whole forward pass

    else:

        @app.post("/v1/ranking")
        def ranking_lock(body: RankingRequest) -> dict[str, Any]:
            with ranker.lock:  # one model, one request at a time
                return ranker.rank(body)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--mode", choices=["lock", "loop"], default="lock")
    parser.add_argument("--max-length", type=int, default=None, help="longest pair in tokens (default: model's)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    logging.basicConfig(level="WARNING")
    if args.threads:
        torch.set_num_threads(args.threads)
    ranker = NaiveRanker(args.model, args.max_length)
    uvicorn.run(create_app(ranker, args.mode), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
