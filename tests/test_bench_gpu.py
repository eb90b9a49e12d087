"""bench/gpu_throughput.py runs end to end: cleanly skipped without CUDA, and every section exercised on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("peaks", "loop", "stacked_m2", "compiled_loop", "compiled_stacked_m2", "auto_choice_m2", "stacked_m1",
            "stacked_m3", "margins", "profile_m2", "profile_m1", "profile_loop")


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_throughput.py"), *args, "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_no_cuda_skips(tmp_path):
    data = _run(tmp_path)
    assert data["skipped"] == "no CUDA device"
    assert data["environment"]["torch"] and "sections" not in data


def test_cpu_smoke_runs_every_section(tmp_path):
    data = _run(tmp_path, "--device", "cpu", "--smoke")
    sec = data["sections"]
    assert data.get("finished") is True
    for name in SECTIONS:
        assert "error" not in sec[name] and sec[name].get("skipped") is None or name.startswith("compiled"), sec[name]
    assert sec["peaks"]["gemm_tflops"] > 0 and sec["peaks"]["copy_gbps_read_plus_write"] > 0
    for name in ("loop", "stacked_m1", "stacked_m2", "stacked_m3"):
        assert sec[name]["step_ms"] > 0
    for name in ("compiled_loop", "compiled_stacked_m2"):
        assert sec[name].get("step_ms", 0) > 0 and sec[name]["compile_s"] >= 0 or sec[name].get("skipped")
    choice = sec["auto_choice_m2"]
    assert choice["path"] in ("stacked", "per_model") and choice["stacked_ms"] > 0 and choice["per_model_ms"] > 0
    margins = [m for m in sec["margins"].values() if isinstance(m, dict)]
    assert {m["M"] for m in margins} == {1, 2, 3} and all(m["pass_s"] > 0 for m in margins)
    for name in ("profile_m2", "profile_m1", "profile_loop"):
        assert abs(sum(sec[name]["shares"].values()) - 1) < 1e-6 and sec[name]["shares"]["convolution"] > 0
    rows = {r["section"]: r for r in data["table"]}
    assert rows["stacked_m2"]["s_per_model"] > rows["stacked_m2"]["train_s_per_model"] > 0
    assert rows["loop"]["mfu_measured_gemm"] > 0
