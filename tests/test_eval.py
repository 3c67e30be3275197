"""Perplexity and routing traces through the real CLI, checked against transformers."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_cli_errors import assert_clean_error, cli

WINDOW = 64


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from moeflow.corpus import evaluation_text

    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(evaluation_text()[:3000])
    return path


@pytest.fixture(scope="module")
def reference(chat_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_model))
    return tok, AutoModelForCausalLM.from_pretrained(str(chat_model), dtype=torch.float32).eval()


def windows(tok, text: str, n: int) -> list[list[int]]:
    ids = tok.encode(text, add_special_tokens=True)[:n]
    return [w for w in (ids[i : i + WINDOW] for i in range(0, len(ids), WINDOW)) if len(w) >= 2]


def test_perplexity_equals_transformers(chat_model, text_file, reference):
    tok, ref = reference
    r = cli(
        "eval",
        "perplexity",
        "--model",
        str(chat_model),
        "--text",
        str(text_file),
        "--window",
        str(WINDOW),
        "--max-tokens",
        "300",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows(tok, text_file.read_text(), 300):
            logits = ref(torch.tensor([w])).logits[0]
            total += F.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum").item()
            count += len(w) - 1
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(float(np.exp(total / count)), rel=1e-4)


def test_trace_records_the_reference_routing(chat_model, text_file, reference, tmp_path):
    tok, ref = reference
    out = tmp_path / "trace.npz"
    r = cli(
        "trace",
        "--model",
        str(chat_model),
        "--text",
        str(text_file),
        "--window",
        str(WINDOW),
        "--max-tokens",
        "200",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    t = np.load(out)
    meta = json.loads(str(t["meta"]))
    cfg = ref.config
    T, L, K = t["experts"].shape
    assert (L, K) == (cfg.num_hidden_layers, cfg.num_experts_per_tok) and T == 200
    assert meta["format"] == "moeflow-trace-v1" and meta["n_experts"] == cfg.num_experts
    assert meta["expert_bytes"] == 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    assert t["tokens"].tolist() == [x for w in windows(tok, text_file.read_text(), 200) for x in w]
    first = windows(tok, text_file.read_text(), 200)[0]
    with torch.no_grad():
        logits = ref(torch.tensor([first]), output_router_logits=True).router_logits
    for layer in range(L):
        want = np.sort(logits[layer].reshape(len(first), -1).topk(K, dim=-1).indices.numpy(), axis=1)
        assert (np.sort(t["experts"][: len(first), layer], axis=1) == want).all()
    w = t["weights"]
    assert np.allclose(w.sum(-1), 1.0, atol=1e-5)  # this config renormalises its top-k weights


def test_trace_with_runtime_top_k(chat_model, text_file, tmp_path):
    out = tmp_path / "t1.npz"
    r = cli(
        "trace",
        "--model",
        str(chat_model),
        "--text",
        str(text_file),
        "--max-tokens",
        "100",
        "--top-k",
        "1",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    assert np.load(out)["experts"].shape[2] == 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--text", "/nonexistent/file.txt"], "text file not found"),
        (["--text", "builtin:nope"], "unknown built-in text"),
        (["--text", "TEXT", "--top-k", "99"], "experts top_k must be in 1..16"),
        (["--text", "TEXT", "--window", "1"], "window length must be at least 2"),
    ],
)
def test_eval_bad_input(chat_model, text_file, args, needle):
    args = [str(text_file) if a == "TEXT" else a for a in args]
    assert_clean_error(cli("eval", "perplexity", "--model", str(chat_model), *args), needle)


def test_empty_text_and_bad_trace_name(chat_model, tmp_path, text_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_clean_error(cli("eval", "perplexity", "--model", str(chat_model), "--text", str(empty)), "empty")
    r = cli("trace", "--model", str(chat_model), "--text", str(text_file), "--out", str(tmp_path / "t.csv"))
    assert_clean_error(r, "must end in .npz")


def test_chat_keeps_a_conversation(chat_model):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeflow.cli",
            "chat",
            "--model",
            str(chat_model),
            "--max-tokens",
            "6",
            "--max-model-len",
            "64",
        ],
        input="hello there\n\n" + "a long line " * 30 + "\nbye\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") >= 2  # replies to the first and last turns; the long one is reported
    assert "Traceback" not in r.stderr
