"""CPU smoke runs of the KV cache benchmarks' tiny modes (benchmarks/kv_cache.py, benchmarks/kv_quality.py).

Each script runs as its own process, as on the GPU machine, on the smallest settings that still exercise
every kind of row; the checks read what the scripts wrote.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, f"benchmarks/{script}", "--tiny", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_kv_cache_tiny_writes_every_table(tmp_path):
    done = run_script("kv_cache.py", "--out", str(tmp_path), "--prompts", "96", "--batches", "1", "--budgets", "48",
                      "--chunk", "32", "--variants", "--static-prompts", "96", "--prefill-grid", "32:48")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    markdown = (tmp_path / "kv_cache.md").read_text()
    rows = {line.split("|")[3].strip(): line for line in markdown.splitlines() if line.startswith("| 96 | 1 |")}
    assert set(rows) == {"dynamic", "longctx", "snapkv:48", "static"}, markdown
    # Without eviction the cache gives DynamicCache's tokens; snapkv stores its budget (+1 new token).
    assert "| yes |" in rows["longctx"] and "| yes |" in rows["static"], markdown
    assert "| 49 |" in rows["snapkv:48"], markdown
    assert "## Acceptance" in markdown and "| 96 | 32 | 48 |" in markdown, markdown
    assert "failed" not in markdown, markdown
    csv_lines = (tmp_path / "kv_cache.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 4 and csv_lines[0].startswith("time,device")


def test_kv_quality_tiny_writes_json_table_and_plots(tmp_path):
    done = run_script("kv_quality.py", "--out", str(tmp_path), "--contexts", "128", "--budgets", "48",
                      "--policies", "snapkv,think", "--chunk", "32")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "kv_quality.json").read_text())
    assert [(r["policy"], r["budget"]) for r in data["results"]] == [("full cache", None), ("snapkv", 48),
                                                                      ("think", 48)]
    full, snapkv, think = data["results"]
    assert full["passkey"] == 1.0  # the reference target retrieves within its trained length
    assert all(0.0 <= r["passkey"] <= 1.0 and r["perplexity"] > 1.0 for r in data["results"])
    # Evicting 80 of the 128 tokens changes the prediction of the scored half: the perplexity differs.
    assert snapkv["perplexity"] != full["perplexity"] and think["perplexity"] != full["perplexity"]
    markdown = (tmp_path / "kv_quality.md").read_text()
    assert "| snapkv |" in markdown and "| think |" in markdown
    assert (tmp_path / "kv_quality_passkey_128.png").exists() and (tmp_path / "kv_quality_perplexity_128.png").exists()
