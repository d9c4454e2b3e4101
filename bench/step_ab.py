"""A decode step before and after the per-step overhead changes, in one process (issue 14).

Every change is toggled in place, so the variants alternate within seconds of each other and a
shared machine's load hits them alike (fresh processes per variant, bench/step_profile.py,
measure the same things but drift with the neighbours):

- ext: the CPU kernels' library of the base commit (`--base-ext`, its .so) or this tree's (no
  Contiguous node per kernel input); `--exp-ext` adds a third library as a variant of its own;
- heads: Attention.__call__ as before (transposes for one position) or split_heads;
- cache: KVCache.update_and_fetch indexing with `...` (before) or plain slices;
- greedy: argmax of logits - logsumexp(logits) (before) or of the logits;
- "after, stream_generate": every change, through stream_generate's loop (greedy) instead;
- `--threads N`: every change, with N threads for the decode kernels (default: the cores), to see
  whether a kernel thread less lets graph building overlap evaluation.

`--bias` compares instead, on this tree's library, a biased quantized projection's bias added
after qmatvec (a Broadcast and an Add node per projection: before) with the bias added inside
the kernel (this tree: Qwen2's q/k/v), everything else as this tree has it.

Each sample is `--steps` steps in generate's pattern (build step n+1 and its token while step n
evaluates), then the cache is trimmed back to `--context`. Medians over `--rounds` of the wall
time and of the process's CPU time (all threads) per step: on an oversubscribed machine the CPU
time still counts the work a step does, where the wall time mostly counts the neighbours.

    git archive <base> | tar -x -C /tmp/base
    PYTHONPATH=/tmp/base python -c "from mlxgen.backends.cpu import ext; ext.main()"  # its .so
    python bench/step_ab.py --model smollm2:135m --base-ext /path/to/base/_mlxgen_cpu*.so
    python bench/step_ab.py --model qwen2.5-coder:0.5b --bias
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import time
from functools import partial

import mlx.core as mx

import mlxgen
from mlxgen.backends.cpu import ext as cpu_ext
from mlxgen.backends.cpu import layers, ops
from mlxgen.backends.swap import plug
from mlxgen.cache import KVCache
from mlxgen.models.attention import Attention
from mlxgen.models.llama import MLP
from mlxgen.prefill import prefill


def attention_before(self, x, cache=None, last_only=False):
    # Attention.__call__ of the base commit.
    B, L, _ = x.shape
    q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
    k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
    if "q_norm" in self:
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    out = self.attend(q, k, v, cache, last_only)
    return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, out.shape[2], -1))


def update_before(self, keys, values):
    # KVCache.update_and_fetch of the base commit.
    prev = self.offset - self.start
    n = keys.shape[2]
    if prev + n > self.keys.shape[2]:
        self._realloc(0, max(prev + n, self.reserved - self.start))
    self.offset += n
    self.keys[..., prev : prev + n, :] = keys
    self.values[..., prev : prev + n, :] = values
    return self.keys[..., : prev + n, :], self.values[..., : prev + n, :]


def quantized_linear_bias_after(self, x):
    # CpuQuantizedLinear.__call__ before the bias went into qmatvec.
    y = layers._quantized_product(x, self)
    if y is None:
        return super(layers.CpuQuantizedLinear, self).__call__(x)
    return y + self.bias if "bias" in self else y


def load_library(path: str):
    spec = importlib.util.spec_from_file_location(cpu_ext.MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def use_library(model, module) -> None:
    # What install() wires to the library: the layers ask ext.loaded(), the plugs hold it.
    cpu_ext._load = lambda: (module, "")
    plug(model, Attention, "sdpa", partial(ops.scaled_dot_product_attention, ext=module))
    plug(model, MLP, "activation", partial(ops.silu_mul, ext=module))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2:135m")
    p.add_argument("--base-ext", help="the base commit's _mlxgen_cpu library")
    p.add_argument("--bias", action="store_true", help="compare the bias after / inside qmatvec instead")
    p.add_argument("--exp-ext", help="another library to try on top of every other change")
    p.add_argument("--threads", type=int, help="also: every change, with this many decode kernel threads")
    p.add_argument("--context", type=int, default=150)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()

    model, tokenizer = mlxgen.load(a.model)
    assert model.runtime.backend == "cpu", "needs the CPU backend with its kernels"
    if not (a.bias or a.base_ext):
        p.error("give --base-ext or --bias")
    libs = {"base": load_library(a.base_ext) if a.base_ext else None, "new": cpu_ext.loaded()}
    if a.exp_ext:
        libs["exp"] = load_library(a.exp_ext)
    default_threads = layers.MATVEC_THREADS
    current = {"call": Attention.__call__, "update": KVCache.update_and_fetch,
               "linear": layers.CpuQuantizedLinear.__call__}
    rng = random.Random(0)
    ids = [rng.randrange(1000, min(30000, model.args.vocab_size - 1)) for _ in range(a.context)]
    cache = model.make_cache()
    mx.eval(prefill(model, ids, cache))

    def configure(lib: str, heads: bool, slices: bool, threads: int = default_threads,
                  bias_inside: bool = True) -> None:
        use_library(model, libs[lib])
        layers.CpuQuantizedLinear.__call__ = current["linear"] if bias_inside else quantized_linear_bias_after
        layers.MATVEC_THREADS = ops._THREADS = threads
        Attention.__call__ = current["call"] if heads else attention_before
        KVCache.update_and_fetch = current["update"] if slices else update_before

    def run(greedy_fast: bool) -> float:
        def pick(logits):
            logits = logits[:, -1, :]
            if not greedy_fast:
                logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            return mx.argmax(logits, axis=-1)

        token = pick(model(mx.array([[ids[-1]]]), cache))
        mx.async_eval(token)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(a.steps):
            nxt = pick(model(token[None], cache))
            mx.async_eval(nxt)
            token.item()
            token = nxt
        token.item()
        ms = 1e3 * (time.perf_counter() - t0) / a.steps, 1e3 * (time.process_time() - c0) / a.steps
        for layer in cache:
            layer.trim(layer.offset - a.context)
        return ms

    def generate() -> float:
        # stream_generate's decode loop on the same cache (one prompt token prefilled): its own
        # cost (detokenizer, stop matching, stats) shows against the bare loop above.
        r, c0 = None, time.process_time()
        for r in mlxgen.stream_generate(model, tokenizer, ids + [ids[-1]], cache=cache,
                                        max_tokens=a.steps + 1):
            pass
        cpu = 1e3 * (time.process_time() - c0) / (a.steps + 1)  # includes one token's prefill
        for layer in cache:
            layer.trim(layer.offset - a.context)
        return 1e3 / r.stats.decode_tps, cpu

    # (name, greedy without logsumexp, configure's arguments: library, heads, cache slices[, threads])
    variants = [("before", False, ("base", False, False)), ("+ext", False, ("new", False, False)),
                ("+heads", False, ("new", True, False)), ("+cache", False, ("new", True, True)),
                ("after (+greedy)", True, ("new", True, True))]
    if a.bias:
        variants = [("before", True, ("new", True, True, default_threads, False)),
                    ("bias inside qmatvec", True, ("new", True, True))]
    if a.exp_ext:
        variants.append(("after + exp-ext", True, ("exp", True, True)))
    if a.threads:
        variants.append((f"after, {a.threads} kernel threads", True, ("new", True, True, a.threads)))
    times = {v[0]: [] for v in variants}
    times["after, stream_generate"] = []
    for name, fast, args in variants:  # warm each once
        configure(*args)
        run(fast)
    for _ in range(a.rounds):
        for name, fast, args in variants:
            configure(*args)
            times[name].append(run(fast))
        configure("new", True, True)
        times["after, stream_generate"].append(generate())
    def med(name: str, i: int) -> float:
        return statistics.median(t[i] for t in times[name])

    print(f"{a.model}, ~{a.context} cached tokens, {a.steps} piped steps per sample, medians of "
          f"{a.rounds} interleaved rounds; CPU ms: the process's CPU time (all threads) per step")
    print("| variant | wall ms per step | vs before | CPU ms per step | vs before |\n|---|---|---|---|---|")
    for name in times:
        print(f"| {name} | {med(name, 0):.2f} | {med(name, 0) / med('before', 0):.3f} | "
              f"{med(name, 1):.2f} | {med(name, 1) / med('before', 1):.3f} |")


if __name__ == "__main__":
    main()
