"""Checkpoint shapes the loader must read: many shards with an index, 16-bit tensors on disk."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeflow.errors import CheckpointError
from moeflow.loader.checkpoint import INDEX, Checkpoint
from moeflow.loader.load import load

from test_parity import our_logits, prompt
from tiny_models import build_reference


def test_sharded_checkpoint_with_index(tmp_path):
    ref = build_reference("deepseek_v3")
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 2
    tokens = prompt(20, seed=5)
    with torch.no_grad():
        want = ref(torch.tensor([tokens])).logits[0]
    got = our_logits(load(tmp_path, progress=False), tokens, 12)
    assert (got - want).abs().max().item() <= 1e-4


def test_index_naming_a_missing_shard(tmp_path):
    build_reference("qwen3_moe").save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16])
def test_16_bit_file_computes_in_fp32(tmp_path, file_dtype):
    build_reference("mixtral").to(file_dtype).save_pretrained(tmp_path)
    # the reference reads the same 16-bit files and computes in fp32
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = prompt(18, seed=6)
    with torch.no_grad():
        want = ref(torch.tensor([tokens])).logits[0]
    lm = load(tmp_path, dtype=torch.float32, progress=False)
    assert lm.experts.buffers[0].dtype == torch.float32
    assert (our_logits(lm, tokens, 10) - want).abs().max().item() <= 1e-4
