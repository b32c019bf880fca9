"""Model resolution: local Hugging Face directories load offline; bad names fail clearly."""

from __future__ import annotations

import json

import pytest
import torch

import snncc
from snncc.blockwise import load_all_weights
from snncc.errors import InputError, ModelError, ModelNotFoundError
from snncc.frontend import trace
from snncc.models import load_model


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(256)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<0>")


def test_local_directory_loads_offline_and_compiles(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny = load_model("tiny-llama")
    tiny.module.model.save_pretrained(tmp_path)
    _byte_level_tokenizer().save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.task == "causal-lm" and loaded.max_positions == 256
    assert loaded.weights is not None  # traced on the meta device, weights read a block at a time
    ids = torch.randint(0, 256, (1, 12))
    ann = trace(loaded)
    load_all_weights(loaded, ann)
    assert torch.equal(ann(ids), tiny.module(ids))
    program = snncc.compile(str(tmp_path), passes="encode", T=8, calib_tokens=256)
    assert program(ids).shape == (1, 12, 256)


def test_directory_without_tokenizer_is_refused_in_one_clear_message(tmp_path):
    load_model("tiny-llama").module.model.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="no usable tokenizer"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("name", ["no-such-model", "a/b/c"])
def test_unknown_names_list_the_builtins(name):
    with pytest.raises(ModelNotFoundError, match="tiny-llama"):  # a FileNotFoundError
        load_model(name)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_auto_dims_trace_the_same_program(name):
    """The AUTO-dims export (taken where torch cannot prove a mask guard over named dims, as
    torch 2.11 cannot on transformers' llama) keeps batch and length dynamic and computes the same."""
    from snncc.frontend import _export

    model = load_model(name)
    named, auto = (_export(model.module, 64, tries=(auto,)).module() for auto in (False, True))
    for shape in [(1, 5), (3, 17)]:
        ids = torch.randint(0, 200, shape)
        torch.testing.assert_close(auto(ids), named(ids), rtol=0, atol=0)


def _tiny_hf_llama(attn_implementation: str, vocab_size: int = 256):
    import transformers as tf

    from snncc.models import _tiny_config

    config = _tiny_config("llama")
    config.vocab_size = vocab_size
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def test_hf_module_with_sdpa_attention_compiles_spike_driven_and_is_left_unchanged():
    model = _tiny_hf_llama("sdpa").train()
    program = snncc.compile(model, passes="las", calib_tokens=256)
    targets = {n.target for n in program.graph_module.graph.nodes}
    assert torch.ops.snn.spike_matmul.default in targets
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    assert program.info.coverage["coverage"] == 1.0 and not program.info.coverage["analog_sites"]
    assert program.info.max_positions == 256  # the model's own position limit, not the 2048 default
    assert model.config._attn_implementation == "sdpa" and model.training
    assert all(layer.self_attn.config._attn_implementation == "sdpa" for layer in model.model.layers)


def test_hf_module_without_tokenizer_needs_a_byte_vocabulary():
    with pytest.raises(InputError, match="pass its tokenizer"):
        load_model(_tiny_hf_llama("eager", vocab_size=1000))


_MARKER_CODE = "import pathlib\npathlib.Path(__file__).with_name('IMPORTED').write_text('ran')\n"


def _remote_code_folder(tmp_path, config_file: str):
    """A saved tiny llama whose `config_file` names a class in a Python file beside it
    (auto_map); importing that file would leave a marker file."""
    load_model("tiny-llama").module.model.save_pretrained(tmp_path)
    _byte_level_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "modeling_evil.py").write_text(_MARKER_CODE + "class Evil:\n    pass\n")
    config = json.loads((tmp_path / config_file).read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.Evil", "AutoModelForCausalLM": "modeling_evil.Evil",
                          "AutoTokenizer": ["modeling_evil.Evil", None]}
    (tmp_path / config_file).write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
def test_model_folder_asking_to_run_its_code_is_refused_without_importing_it(tmp_path, config_file):
    folder = _remote_code_folder(tmp_path, config_file)
    with pytest.raises(InputError, match="auto_map") as refused:
        load_model(str(folder))
    assert len(str(refused.value).splitlines()) == 1
    assert not (folder / "IMPORTED").exists()
