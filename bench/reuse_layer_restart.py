"""Recompute chosen chunk tokens from a middle layer only (issue 18, session 13; not adopted).

The question it answers: is the deviation of documents stored apart concentrated in the late
layers? If so, a chosen token could start at layer l0 from its hidden state as stored (encoded
after its context) and be recomputed from there on, at (L - l0) / L of the cost. The prompt's
text runs through every layer as usual. This script patches `recompute_placed` for the
measurement (the library has no such mode); each chosen token's hidden state at l0 comes from a
prefill of its context + chunk. Quality only (~2.1k prompts after the stand-in):

    nice python bench/reuse_layer_restart.py --model smollm2 --questions 5 \
        --configs 0.15:0,0.15:0.1,0.3:0.5,1.0:0.85     # share of each chunk : l0 / L
"""

from __future__ import annotations

import argparse
import math
import statistics

import mlx.core as mx

import mlxgen.reuse.compose as compose
from mlxgen import load
from mlxgen.bench.reuse_data import fit
from mlxgen.bench.reuse_docs import doc_sets
from mlxgen.bench.reuse_quality import composed_quality, rag_segments, reference
from mlxgen.reuse import ChunkStore
from mlxgen.reuse.recompute import forward_at


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--questions", type=int, default=5, help="per document set")
    p.add_argument("--configs", default="0.15:0,0.3:0.5")
    a = p.parse_args()
    configs = [tuple(float(x) for x in c.split(":")) for c in a.configs.split(",")]
    model, tok = load(a.model)
    n_layers = len(model.layers)
    state: dict = {}
    local: dict = {}

    def hidden_at(chunk, l0):  # the chunk's hidden states entering layer l0, as stored
        key = (chunk.token_ids, chunk.context, l0)
        if key not in local:
            h = model.model.embed(mx.array([*chunk.context, *chunk.token_ids])[None])
            cache = model.make_cache()
            for i in range(l0):
                h = model.layers[i](h, cache[i])
            local[key] = h[0, len(chunk.context):]
            mx.eval(local[key])
        return local[key]

    def restart(model, cache, ids, spans, text_positions, fraction, strategy, block,
                contexted=False, ape=None):
        l0, share = state["l0"], state["share"]
        firsts = {s: math.ceil(share * n - 1e-9) for s, n in spans}
        text = sorted(text_positions)
        ht = model.model.embed(mx.array(list(ids))[mx.array(text)][None])
        if l0:
            ht = forward_at(model, cache, text, ht, range(l0), block)
        rows = {p: ht[0, j] for j, p in enumerate(text)}
        for s, k in firsts.items():
            h = (hidden_at(state["chunks"][s], l0) if l0
                 else model.model.embed(mx.array(list(ids[s:s + k]))))
            rows.update({s + j: h[j] for j in range(k)})
        selected = sorted(rows)
        h = forward_at(model, cache, selected, mx.stack([rows[p] for p in selected])[None],
                       range(l0, n_layers), block)
        return sum(firsts.values()), h[:, -1:]

    compose.recompute_placed = restart
    res: dict = {}
    for ds in doc_sets(4):
        store = ChunkStore(model, tok)
        docs = [fit(tok, d, 512) for d in ds.docs]
        for q in ds.questions[: a.questions]:
            segs = rag_segments(tok, store, q, docs, 512, context=True, stand_in=True)
            comp = compose.plan(model, tok, segs, parse_special=True)
            starts = [sum(len(s.ids) for s in comp.segments[:i]) for i in range(len(comp.segments))]
            state["chunks"] = {o: s.chunk for o, s in zip(starts, comp.segments) if s.chunk}
            cont, ref, _ = reference(model, comp.ids, stop=tok.eos_token_ids)
            for share, l0f in configs:
                state.update(share=share, l0=round(l0f * n_layers))
                qual, _, n = composed_quality(model, tok, segs, cont, ref)
                cost = n * (n_layers - state["l0"]) / n_layers
                res.setdefault(f"{share} from layer {state['l0']}", []).append(
                    (qual.agreement, qual.kl, cost))
            print(ds.name, q[:40], flush=True)
    print(f"{a.model}, {n_layers} layers; agreement mean / min, KL, row-layers / L")
    for k, v in res.items():
        print(f"{k}: {statistics.mean(x[0] for x in v):.4f} / {min(x[0] for x in v):.3f}, "
              f"{statistics.mean(x[1] for x in v):.4f}, {statistics.mean(x[2] for x in v):.0f}")


if __name__ == "__main__":
    main()
