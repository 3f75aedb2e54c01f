"""``entmaxkv-bench e2e`` smoke run on CPU: a tiny Llama, every variant, valid JSON, plot and summary."""

from __future__ import annotations

import json

import pytest

from entmaxkv_compile.bench import e2e
from entmaxkv_compile.bench.__main__ import main

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def test_e2e_tiny_cpu(tmp_path, capsys, monkeypatch) -> None:
    written = []  # every state of e2e.json, to see the partial records of a variant in progress
    write = e2e._write
    monkeypatch.setattr(
        e2e, "_write", lambda report, out: written.append(json.dumps(report)) or write(report, out)
    )
    monkeypatch.setattr(e2e, "CHECKPOINT_EVERY", 4)
    main([
        "e2e", "--out", str(tmp_path), "--preset", "tiny", "--contexts", "96,160", "--prefill-len", "64",
        "--steps", "5", "--warmup", "2", "--inner-compiler", "aot_eager", "--dense-backend", "aot_eager",
        "--device", "cpu", "--dtype", "bfloat16", "--variants", "sdpa,entmaxkv,inductor,reference",
    ])  # fmt: skip
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert (tmp_path / "e2e.png").stat().st_size > 0
    assert [e["context"] for e in report["results"]] == [96, 160]
    for entry in report["results"]:
        # the entmax-cache variants run first (one prefill per attention kind), sdpa last
        assert list(entry["variants"]) == ["entmaxkv", "inductor", "reference", "sdpa"]
        # bf16: entmaxkv computes what the reference attention computes; the model as written (inductor)
        # rounds its scores to bf16 first, so its tokens are compared and reported but may differ
        assert entry["tokens_equal"]["reference"] is True and entry["first_divergence"]["reference"] is None
        assert set(entry["tokens_equal"]) == {"reference", "inductor"}
        assert entry["prefill_entmax15"]["prefill_tokens"] == 64
        for name, r in entry["variants"].items():
            assert "partial" not in r
            assert len(r["tokens"]) == 6 and len(r["margins_ulps"]) == 5 and min(r["margins_ulps"]) >= 0
            assert r["tokens_per_s"] > 0 and r["ms_per_token"] > 0 and r["timed_steps"] == 3
            assert r["recompiles_after_warmup"] == 0 and r["compiles"] == (name != "reference")
            assert r["cudagraphs"] is False
        assert entry["variants"]["entmaxkv"]["decode_attn_sites"] == 2
        assert entry["variants"]["inductor"]["decode_attn_sites"] == 0
    assert [e["prefill_sdpa"]["prefix_reused"] for e in report["results"]] == [False, True]
    partials = [json.loads(w)["results"][0]["variants"]["entmaxkv"] for w in written[:3]]
    assert [(p["partial"], p["tokens_done"], p["compiles"]) for p in partials[:2]] == [
        (True, 1, 1),
        (True, 4, 1),
    ]
    assert partials[0]["first_step_s"] > 0 and "partial" not in partials[2]
    out = capsys.readouterr().out
    assert "× inductor" in out and "× sdpa" in out and "tokens == reference: True" in out
    assert "target" not in out  # no targets at these contexts, none for the tiny preset's compile

    # a run cut short: the summary reads partial entries and states the targets it can judge
    entry = report["results"][1]
    entry["context"] = 131072
    cut = {"variant": "sdpa", "partial": True, "first_step_s": 2.5, "tokens_done": 250, "compiles": 1}
    entry["variants"]["sdpa"] = cut
    (tmp_path / "cut.json").write_text(json.dumps(report))
    main(["e2e-summary", str(tmp_path / "cut.json"), str(tmp_path / "missing.json")])
    out = capsys.readouterr().out
    ratio = entry["variants"]["entmaxkv"]["tokens_per_s"] / entry["variants"]["inductor"]["tokens_per_s"]
    verdict = "met" if ratio >= 1.5 else "MISSED"
    assert f"{ratio:.2f}× inductor (target ≥ 1.5: {verdict})" in out
    assert "× sdpa" not in out.split("128K entmaxkv")[1]
    assert "cut short after 250 steps (first call 2.5 s, 1 compile(s) so far)" in out
    assert "missing.json" in out and "no result: FileNotFoundError" in out
