"""The fidelity model: shapes, cache decode against the full forward, chunked prefill, entmax backward,
compile-friendliness of a decode step, and one smoke run of the training script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import entmaxkv_compile.models.llama_entmax as lm
from entmaxkv_compile.models.corpus import (
    KEY_DIGITS,
    copy_sequence,
    is_validation,
    passkey_sequence,
    retrieval_sequence,
)
from entmaxkv_compile.models.llama_entmax import EntmaxLM, LMConfig, count_params, load_model, save_model
from entmaxkv_compile.reference.entmax import entmax

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> EntmaxLM:
    torch.manual_seed(0)
    m = EntmaxLM(LMConfig()).eval()
    with torch.no_grad():  # larger weights than the init, so attention is sparse and positions matter
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(5)
    return m


def test_shapes_and_size(model: EntmaxLM) -> None:
    tokens = torch.randint(0, 256, (2, 40))
    assert model(tokens).shape == (2, 40, 256)
    n = count_params(model)
    assert 1_000_000 <= n <= 4_000_000, n  # fp16 weights <= 8 MB
    layers = model.qkv(tokens)
    assert len(layers) == 4
    q, k, v = layers[0]
    assert q.shape == (2, 8, 40, 64) and k.shape == v.shape == (2, 2, 40, 64)


def test_gqa_config_is_checked() -> None:
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        LMConfig(n_heads=6, n_kv_heads=4)


@torch.no_grad()
def test_cache_decode_matches_full_forward(model: EntmaxLM) -> None:
    tokens = torch.randint(0, 256, (2, 48))
    full = model(tokens)
    model.setup_cache(2, 64)
    start = 40
    pre = model(tokens[:, :start], input_pos=torch.arange(start))
    torch.testing.assert_close(pre, full[:, :start], atol=1e-4, rtol=1e-4)
    for i in range(start, 48):
        step = model(tokens[:, i : i + 1], input_pos=torch.tensor([i]))
        torch.testing.assert_close(step[:, 0], full[:, i], atol=1e-4, rtol=1e-4)
    q, k, v = model.qkv(tokens)[-1]
    cache = model.attention_layers[-1].cache
    torch.testing.assert_close(cache.k[:, :, :48], k, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_chunked_prefill_matches(model: EntmaxLM, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = torch.randint(0, 256, (1, 50))
    full = model(tokens)
    model.setup_cache(1, 60)
    cached = model(tokens, input_pos=torch.arange(50))
    monkeypatch.setattr(lm, "SCORE_CHUNK_ELEMS", 8 * 50 * 7)  # 7-row query chunks
    torch.testing.assert_close(model(tokens), full, atol=1e-4, rtol=1e-4)
    model.setup_cache(1, 60)
    torch.testing.assert_close(model(tokens, input_pos=torch.arange(50)), cached, atol=1e-4, rtol=1e-4)


def test_entmax_backward_matches_autograd() -> None:
    torch.manual_seed(1)
    x = (3 * torch.randn(3, 5, 33)).requires_grad_()
    mask = torch.zeros(33)
    mask[25:] = float("-inf")
    g = torch.randn(3, 5, 33)
    (lm.entmax15(x + mask) * g).sum().backward()
    fast = x.grad.clone()
    x.grad = None
    (entmax(x + mask, alpha=1.5, dim=-1) * g).sum().backward()
    torch.testing.assert_close(fast, x.grad, atol=1e-5, rtol=1e-4)
    assert (fast[..., 25:] == 0).all()


@torch.no_grad()
def test_decode_step_compiles_without_breaks_or_recompiles(model: EntmaxLM) -> None:
    tokens = torch.randint(0, 256, (1, 12))
    model.setup_cache(1, 16)
    model(tokens[:, :8], input_pos=torch.arange(8))
    step = torch.compile(model, backend="eager", fullgraph=True)
    eager = model(tokens[:, 8:9], input_pos=torch.tensor([8]))
    torch.testing.assert_close(step(tokens[:, 8:9], input_pos=torch.tensor([8])), eager)
    with torch.compiler.set_stance("fail_on_recompile"):
        for i in range(9, 12):
            step(tokens[:, i : i + 1], input_pos=torch.tensor([i]))


def test_save_load_roundtrip(model: EntmaxLM, tmp_path: Path) -> None:
    save_model(model, tmp_path / "m.pt", {"steps": 0})
    loaded, meta = load_model(tmp_path / "m.pt")
    assert meta == {"steps": 0}
    assert (tmp_path / "m.pt").stat().st_size < 8 << 20
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), atol=0.05, rtol=0.05)  # fp16 weights


def test_passkey_sequence_layout() -> None:
    filler = np.frombuffer(b"x = 1\n" * 200, dtype=np.uint8)
    pk = passkey_sequence(filler, 300, np.random.default_rng(0), depth=0.5)
    text = pk.tokens.tobytes().decode()
    key = text[pk.answer[0] : pk.answer[-1] + 1]
    assert len(pk.tokens) == 300 and len(key) == KEY_DIGITS and key.isdigit()
    assert f"# passkey: {key}\n" in text and text.endswith(f"passkey: {key}\n")
    assert is_validation("stdlib/os.py") == is_validation("stdlib/os.py")


def test_retrieval_sequence_rounds() -> None:
    filler = np.frombuffer(b"x = 1\n" * 200, dtype=np.uint8)
    pk = retrieval_sequence(filler, 301, np.random.default_rng(0), rounds=3)
    text = pk.tokens.tobytes().decode()
    assert len(pk.tokens) == 301 and len(pk.answer) == 3 * KEY_DIGITS
    keys = [text[a : a + KEY_DIGITS] for a in pk.answer[::KEY_DIGITS]]
    assert all(k.isdigit() for k in keys)
    for k, a in zip(keys, pk.answer[::KEY_DIGITS]):  # each question asks for the latest needle before it
        before = text[:a]
        assert before.endswith("# repeat the passkey: ") and before.rfind(f"# passkey: {k}\n") >= 0
        assert before.rfind("# passkey: ") == before.rfind(f"# passkey: {k}\n")


def test_copy_sequence_targets_the_second_copy() -> None:
    filler = np.frombuffer(bytes(range(256)) * 4, dtype=np.uint8)
    pk = copy_sequence(filler, 200, np.random.default_rng(1), span=20)
    assert len(pk.tokens) == 200 and len(pk.answer) == 19
    second = pk.tokens[pk.answer[0] - 1 : pk.answer[-1] + 1]
    first = [i for i in range(pk.answer[0] - 20) if np.array_equal(pk.tokens[i : i + 20], second)]
    assert first, "the copied string occurs earlier"


def test_partial_rope_leaves_slow_pairs_unrotated() -> None:
    cos, sin = lm.rope_angles(torch.arange(50), head_dim=16, base=100.0, fraction=0.5)
    half = torch.tensor([True] * 4 + [False] * 4).repeat(2)  # [x1 | x2] halves share the frequencies
    assert (cos[:, ~half] == 1).all() and (sin[:, ~half] == 0).all()
    assert (sin[1:, half] != 0).all()


def test_training_smoke_run(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "examples/train_entmax_lm.py")
    # 3 steps: two on 64-byte windows (the curriculum), the last on the 128-byte smoke windows
    cmd = [
        sys.executable,
        script,
        "--smoke",
        "--short-seq-len",
        "64",
        "--short-frac",
        "0.5",
        "--out-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "train_log.txt").read_text()
    assert "val_bpb" in log and "done" in log
    assert "step 2: curriculum switches from 64- to 128-byte windows" in log
    model, meta = load_model(tmp_path / "entmax_lm.pt")
    assert meta["steps"] == 3 and np.isfinite(meta["val_bpb"])
