"""GGUF reading: the real SmolLM2 file against transformers' own GGUF loader, and bad files."""

import numpy as np
import pytest
import torch

from moeflow.convert.gguf import read_gguf

from test_cli_errors import assert_clean_error, cli


@pytest.fixture(scope="module")
def smollm2():
    from moeflow.default_model import smollm2_gguf

    path = smollm2_gguf()
    return path, read_gguf(path, progress=False)


def test_tensors_equal_transformers_gguf_loader(smollm2):
    from transformers import AutoModelForCausalLM

    path, ours = smollm2
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    theirs = ref.state_dict()
    if ours.config["tie_word_embeddings"]:
        theirs.pop("lm_head.weight")
    assert set(theirs) == set(ours.tensors)
    for name, t in theirs.items():
        assert torch.equal(ours.tensors[name], t), name
    assert ours.config["num_hidden_layers"] == 30 and ours.config["num_key_value_heads"] == 3


def test_tokenizer_equals_transformers_gguf_tokenizer(smollm2):
    from transformers import AutoTokenizer

    path, ours = smollm2
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = [
        "Hello world! The year 2024 had 365 days.\n\tTabs, émojis 🙂 and naïve café.",
        "<|im_start|>user\nWhat is 12*34?<|im_end|>\n",
        "def f(x):\n    return x ** 2  # square",
    ]
    for text in texts:
        assert ours.tokenizer.encode(text) == ref.encode(text)
        assert ours.tokenizer.decode(ours.tokenizer.encode(text)) == text
    msgs = [{"role": "user", "content": "Hi"}]
    assert ours.tokenizer.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(
        msgs, tokenize=False
    )


def test_tokenizer_follows_llama_cpp_smollm_pre_tokenizer(smollm2):
    """transformers' GGUF loader ignores tokenizer.ggml.pre = "smollm" (digits split first), so a
    space run before a digit differs from it; these ids come from llama.cpp's own tokenizer on this
    file (llama-cpp-python 0.3.36, vocab_only), which ours matched on every text we tried."""
    _, ours = smollm2
    text = "The year 2024 had   365 days.\na  1\n\n 22 333"
    want = [504, 713, 216, 34, 32, 34, 36, 761, 333, 35, 38, 37, 2009, 30, 198]
    want += [81, 256, 33, 8866, 34, 34, 216, 35, 35, 35]
    assert ours.tokenizer.encode(text) == want


def write_gguf(path, arch: str = "llama", qtype: str = "F32"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_context_length(64)
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    else:  # raw blocks of the named type: 32 values per block
        block, nbytes = gguf.GGML_QUANT_SIZES[kind]
        w.add_tensor(
            "token_embd.weight",
            np.zeros((16, 32 // block * nbytes), np.uint8),
            raw_dtype=kind,
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_non_llama_gguf_is_refused(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    assert_clean_error(
        cli("convert", "dense-to-moe", str(path), str(tmp_path / "o"), "--experts", "4", "--top-k", "2"),
        "architecture 'gpt2'",
    )


def test_unsupported_quantisation_is_named(tmp_path):
    path = write_gguf(tmp_path / "q5.gguf", qtype="Q5_1")
    r = cli("convert", "dense-to-moe", str(path), str(tmp_path / "o"), "--experts", "4", "--top-k", "2")
    assert_clean_error(r, "token_embd.weight", "Q5_1")


def test_garbage_gguf(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"not a gguf at all" * 10)
    r = cli("convert", "dense-to-moe", str(path), str(tmp_path / "o"), "--experts", "4", "--top-k", "2")
    assert_clean_error(r, "bad.gguf")
