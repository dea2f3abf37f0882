"""Streaming compression of models larger than memory, block by block, resumable (``docs/streaming.md``)."""
from compresskit.stream.driver import StreamResult, compress_streaming
from compresskit.stream.weights import ShardedWeights, empty_parameters

__all__ = ["ShardedWeights", "StreamResult", "compress_streaming", "empty_parameters"]
