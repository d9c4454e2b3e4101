"""K/V reuse: position-independent chunks (ChunkStore), segment prompts placing them at any
offset (compose), selective recompute (recompute), and multi-turn prefix reuse (Session)."""

from .chunk_store import Chunk, ChunkKV, ChunkStore, encode_chunk
from .compose import is_segments, plan
from .fingerprint import model_fingerprint
from .recompute import STRATEGIES
from .session import Session, common_prefix

__all__ = [
    "Chunk", "ChunkKV", "ChunkStore", "Session", "encode_chunk", "is_segments", "plan",
    "model_fingerprint", "common_prefix", "STRATEGIES",
]
