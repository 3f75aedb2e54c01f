"""``entmaxkv-bench e2e`` smoke run on CPU: a tiny Llama, every variant, valid JSON and plot."""

from __future__ import annotations

import json

import pytest

from entmaxkv_compile.bench.__main__ import main

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def test_e2e_tiny_cpu(tmp_path) -> None:
    main([
        "e2e", "--out", str(tmp_path), "--preset", "tiny", "--contexts", "96,160", "--prefill-len", "64",
        "--steps", "5", "--warmup", "2", "--inner-compiler", "aot_eager", "--dense-backend", "aot_eager",
        "--device", "cpu", "--dtype", "float32",
    ])  # fmt: skip
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert (tmp_path / "e2e.png").stat().st_size > 0
    assert [e["context"] for e in report["results"]] == [96, 160]
    for entry in report["results"]:
        assert set(entry["variants"]) == {"entmaxkv", "inductor", "sdpa"}
        assert entry["entmaxkv_tokens_equal_dense"] is True
        assert entry["prefill_entmax15"]["prefill_tokens"] == 64
        for r in entry["variants"].values():
            assert len(r["tokens"]) == 6 and r["tokens_per_s"] > 0 and r["ms_per_token"] > 0
            assert r["recompiles_after_warmup"] == 0 and r["compiles"] == 1
            assert r["cudagraphs"] is False
        assert entry["variants"]["entmaxkv"]["decode_attn_sites"] == 2
        assert entry["variants"]["inductor"]["decode_attn_sites"] == 0
    assert [e["prefill_sdpa"]["prefix_reused"] for e in report["results"]] == [False, True]
