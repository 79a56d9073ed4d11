"""`memsparse bench speed` end to end on the CPU at a tiny geometry: every point carries its timings and floors,
and fp8 routing keys shrink what a routing round reads."""

import json

import pytest

from memsparse.eval.speed import Settings, run


@pytest.mark.slow
def test_bench_speed_tiny(tmp_path):
    out = tmp_path / "speed.json"
    res = run(out, [16384], ["qwen3-4b"], Settings(repeats=1, new_tokens=3, doc_len=256, batch=(1, 2)), tiny=True)
    assert json.loads(out.read_text())["points"] == res["points"]
    full, fp8 = res["points"]
    assert (full["key_dtype"], fp8["key_dtype"]) == ("bf16", "fp8") and full["tokens"] == 16384
    for p in (full, fp8):
        assert p["routing_ms"] > 0 and p["ttft_ms"] >= p["routing_ms"] and p["decode_ms_per_token"] > 0
        assert p["routing_floor_ms"] > 0 and p["decode_floor_ms"] > 0
    # the CPU model is float32: fp8 keys (1 byte + a 4-byte scale per chunk) read about a quarter of the bytes
    assert 0.2 < fp8["routing_bytes"] / full["routing_bytes"] < 0.3
    assert fp8["bytes_per_token"] < full["bytes_per_token"]
    assert [d["batch"] for d in res["decode_batches"]] == [2, 2]
