"""rankserve: an open, NIM-compatible reranking service for llama-nemotron-rerank-1b-v2."""

__version__ = "0.1.0"
