"""onnxruntime session over an exported folder (needs no torch model): ``ChunkSession`` plus streaming helpers."""
from .session import ChunkSession, load_manifest
from .stream import greedy_generate, iter_chunks, perplexity, token_losses

__all__ = ["ChunkSession", "load_manifest", "iter_chunks", "token_losses", "perplexity", "greedy_generate"]
