"""Documents stored after a stand-in document (mlxgen/reuse/stand_in.py): the context is the
head, the stand-in as plain text, then the separator; a chunk stored that way is still exact at
recompute=1.0, and its K/V differ from the same chunk stored after the head alone."""

import mlx.core as mx
import pytest
from reuse_helpers import max_diff, tiny_model, token_ids

from mlxgen.errors import ConfigError
from mlxgen.reuse import ChunkStore, after_stand_in
from mlxgen.reuse.compose import Composition, Segment
from mlxgen.reuse.stand_in import STAND_IN


class _Tokenizer:
    """Records how the stand-in is encoded; one id per word."""

    def encode(self, text, add_special_tokens=True, parse_special=True):
        self.flags = (add_special_tokens, parse_special)
        return [1 + len(w) for w in text.split()]


def test_stand_in_context_and_exactness():
    model = tiny_model("llama", num_hidden_layers=4)
    ids = token_ids(64, seed=5)
    head, sep = ids[:8], ids[30:32]
    tok = _Tokenizer()
    later = after_stand_in(tok, head, sep)
    assert tok.flags == (False, False)  # plain text: no BOS, no control tokens
    assert later == (*head, *tok.encode(STAND_IN), *sep)

    def run(context, recompute):
        store = ChunkStore(model, None)
        segments = [Segment(head), Segment(ids[8:30], store.add(ids[8:30], context=head)),
                    Segment(sep), Segment(ids[32:56], store.add(ids[32:56], context=context)),
                    Segment(ids[56:])]
        return Composition(segments, ids).run(model, recompute=recompute)[1]

    want = model(mx.array(ids)[None])[:, -1]
    assert max_diff(run(later, 1.0), want) < 1e-4
    assert max_diff(run(later, 0.0), run(head, 0.0)) > 1e-4  # the stand-in reached the K/V


def test_a_chosen_stand_in_text():
    """A caller's own document as the stand-in: encoded as plain text between the head and the
    separator; no text, or not a str, is refused before anything is encoded."""
    tok = _Tokenizer()
    text = "Another station's report <|im_start|> as plain words"
    got = after_stand_in(tok, (7, 8), (9,), text)
    assert tok.flags == (False, False)  # plain text: the control-token text stays literal
    assert got == (7, 8, *tok.encode(text), 9)
    refused = (("  \n", "empty"), (b"bytes", "must be a string"), (None, "must be a string"))
    for bad, says in refused:
        tok.flags = None
        with pytest.raises(ConfigError, match=says):
            after_stand_in(tok, (7,), (9,), bad)
        assert tok.flags is None
