"""K/V reuse: position-independent chunks (ChunkStore), segment prompts placing them at any
offset (compose, with cache surgery in placement), selective recompute (recompute), and multi-turn
prefix reuse (session.Session). generate uses this package for segment prompts, and Session
uses generate: so session is not imported here (import it as mlxgen.Session)."""

from .chunk_store import Chunk, ChunkKV, ChunkStore, encode_chunk
from .compose import is_segments, plan
from .fingerprint import model_fingerprint
from .recompute import STRATEGIES
from .stand_in import after_stand_in

__all__ = [
    "Chunk", "ChunkKV", "ChunkStore", "encode_chunk", "is_segments", "plan",
    "model_fingerprint", "STRATEGIES", "after_stand_in",
]
