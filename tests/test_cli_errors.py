"""Bad input through the real CLI: one clear line on stderr, non-zero exit, no traceback."""

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file


def cli(*args: str, env_cache=None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ)
    if env_cache:
        env["MOEFLOW_CACHE"] = str(env_cache)
    return subprocess.run(
        [sys.executable, "-m", "moeflow.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def assert_clean_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def copy_of(checkpoint, tmp_path):
    def make(name="qwen3_moe"):
        src, _ = checkpoint(name)
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return make


def test_missing_folder(tmp_path):
    assert_clean_error(cli("info", "--model", str(tmp_path / "nope")), "does not exist", "nope")


def test_missing_config(tmp_path):
    assert_clean_error(cli("info", "--model", str(tmp_path)), "config.json not found")


def test_truncated_safetensors(copy_of):
    folder = copy_of()
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_clean_error(cli("generate", "--model", str(folder)), "model.safetensors", "truncated")


def test_unsupported_model_type_lists_supported(copy_of):
    folder = copy_of()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(
        cli("generate", "--model", str(folder)), "'gpt_neox'", "mixtral", "deepseek_v3", "olmoe"
    )


def test_missing_tensor_is_named(copy_of):
    folder = copy_of()
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.self_attn.k_norm.weight"]
    save_file(state, folder / "model.safetensors")
    assert_clean_error(
        cli("generate", "--model", str(folder)), "model.layers.1.self_attn.k_norm.weight", "missing"
    )


def test_missing_expert_is_named(copy_of):
    folder = copy_of()
    state = load_file(folder / "model.safetensors")
    del state["model.layers.0.mlp.experts.5.up_proj.weight"]
    save_file(state, folder / "model.safetensors")
    assert_clean_error(cli("generate", "--model", str(folder)), "experts.5.up_proj", "missing")


def test_wrong_shape_names_both_shapes(copy_of):
    folder = copy_of()
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"][
        :, :32
    ].clone()
    save_file(state, folder / "model.safetensors")
    assert_clean_error(cli("generate", "--model", str(folder)), "q_proj.weight", "(96, 32)", "(96, 64)")


def test_wrong_expert_shape(copy_of):
    folder = copy_of("mixtral")
    state = load_file(folder / "model.safetensors")
    key = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    state[key] = state[key][:, :10].clone()
    save_file(state, folder / "model.safetensors")
    assert_clean_error(cli("generate", "--model", str(folder)), key, "(64, 10)", "(64, 96)")


def test_bad_dtype_and_device(copy_of):
    folder = copy_of()
    assert_clean_error(cli("generate", "--model", str(folder), "--dtype", "int3"), "dtype 'int3'")
    assert_clean_error(cli("generate", "--model", str(folder), "--device", "tpu"), "device 'tpu'")


def test_text_prompt_without_tokenizer(copy_of):
    assert_clean_error(cli("generate", "--model", str(copy_of())), "no tokenizer")


def test_prompt_longer_than_context(chat_model):
    r = cli("generate", "--model", str(chat_model), "--max-model-len", "16", "--prompt", "word " * 40)
    assert_clean_error(r, "prompt has", "context holds 16")


def test_bad_sampling_value(chat_model):
    assert_clean_error(cli("generate", "--model", str(chat_model), "--top-p", "0"), "top_p")
    assert_clean_error(cli("generate", "--model", str(chat_model), "--max-tokens", "-3"), "max_tokens")


def test_bad_io_threads(chat_model):
    r = cli("generate", "--model", str(chat_model), "--expert-memory", "50%", "--io-threads", "0")
    assert_clean_error(r, "io_threads must be at least 1, got 0")


def test_generate_streams_and_summarises(chat_model):
    r = cli("generate", "--model", str(chat_model), "--prompt", "Hello", "--max-tokens", "12", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello")
    summary = r.stderr.strip().splitlines()[-1]
    for field in ("12 tokens", "prefill", "decode", "tok/s", "active per token", "experts used"):
        assert field in summary, summary


def test_generate_json_and_chat(chat_model):
    r = cli(
        "generate",
        "--model",
        str(chat_model),
        "--chat",
        "Hi there",
        "--max-tokens",
        "5",
        "--ignore-eos",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 5 and out["finish_reason"] == "length"
    counts = out["stats"]["expert_counts"]
    # every prompt and generated token that went through the model picked top-4 experts in each of 4 layers
    routed = out["prompt_tokens"] + 4
    assert all(sum(layer) == routed * 4 for layer in counts)


def test_info(chat_model):
    r = cli("info", "--model", str(chat_model))
    assert r.returncode == 0, r.stderr
    for field in ("qwen3_moe", "16 experts", "top-4", "active per token", "per expert", "per token"):
        assert field in r.stdout
