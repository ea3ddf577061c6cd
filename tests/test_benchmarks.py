"""The benchmark scripts run (quickest CPU mode, as subprocesses) so they cannot rot; their helpers are right.

No timing is asserted: the scripts print ratios, the tests check that they run, print every column and say
when a result is not a GPU result. Subprocesses get one thread (OMP/Numba): on a shared 2-core machine a
second OpenMP thread that gets descheduled makes every torch matmul ~100x slower, and speed is not tested.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import offload
import placement
from offload.loading.checkpoint import Checkpoint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import offload_decode  # noqa: E402
from bandwidth import measure_host_to_device_bandwidth  # noqa: E402
from random_checkpoint import MARKER, build_random_checkpoint, read_config  # noqa: E402

TINY_LLAMA = dict(offload_decode.QUICK_CONFIG, num_hidden_layers=3, vocab_size=512, hidden_size=64,
                  intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
TINY_OPT = dict(read_config("opt-125m"), num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                vocab_size=512, word_embed_proj_dim=32, max_position_embeddings=128)
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", MKL_NUM_THREADS="1",
                  HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def run_script(*args, timeout=120):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=ONE_THREAD, capture_output=True,
                          text=True, timeout=timeout)


# ---- the random checkpoint ---------------------------------------------------------------------------
@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_OPT], ids=["llama", "opt"])
def test_random_checkpoint_reads_the_same_in_both_runtimes(tmp_path, config):
    transformers = pytest.importorskip("transformers")
    path = build_random_checkpoint(config, "float32", tmp_path, label="tiny", max_shard_bytes=100_000,
                                   log=lambda *_: None)
    assert (path / "model.safetensors.index.json").is_file()            # sharded like save_pretrained
    checkpoint = Checkpoint(path)                                        # every tensor, exact shapes
    assert checkpoint.eos_token_ids == ()                                # every run makes N tokens
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    assert sum(p.numel() for p in hf.parameters()) == checkpoint.arch.num_params
    assert hf.config.tie_word_embeddings == checkpoint.arch.tie_word_embeddings
    ours = offload.load(path, max_seq_len=32, progress=False)
    prompt = [[3, 14, 15, 92, 65, 35, 89, 79]]
    with torch.inference_mode():
        expected = hf(torch.tensor(prompt)).logits.float()
    torch.testing.assert_close(ours(prompt), expected, atol=1e-4, rtol=1e-4)
    state = hf.state_dict()
    matrix = next(n for n, shape in checkpoint.arch.all_tensors().items() if len(shape) == 2)
    assert 0.015 < state[matrix].std().item() < 0.025                    # N(0, 0.02)
    norm = next(n for n, shape in checkpoint.arch.all_tensors().items() if "norm" in n and n.endswith("weight"))
    assert torch.equal(state[norm], torch.ones_like(state[norm]))


def test_random_checkpoint_is_reused_and_rebuilt_when_incomplete(tmp_path):
    path = build_random_checkpoint(TINY_LLAMA, "bfloat16", tmp_path, log=lambda *_: None)
    weights = path / "model.safetensors"
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    built = weights.stat().st_mtime_ns
    assert build_random_checkpoint(TINY_LLAMA, "bfloat16", tmp_path, log=lambda *_: None) == path
    assert weights.stat().st_mtime_ns == built                         # cached: not rewritten
    other = build_random_checkpoint(TINY_LLAMA, "float16", tmp_path, log=lambda *_: None)
    assert other != path                                                 # one folder per dtype
    (path / MARKER).unlink()                                             # an interrupted build
    assert build_random_checkpoint(TINY_LLAMA, "bfloat16", tmp_path, log=lambda *_: None) == path
    assert (path / MARKER).is_file() and Checkpoint(path).arch.dtype == "bfloat16"


def test_read_config_names_presets_and_files(tmp_path):
    assert read_config("llama-3.1-8b")["num_hidden_layers"] == 32
    reference = REPO / "tests" / "reference_configs" / "mistral-7b-v0.1.json"
    assert read_config(str(reference)) == json.loads(reference.read_text())
    with pytest.raises(placement.ConfigError, match="no such file"):
        read_config(str(tmp_path / "missing.json"))
    with pytest.raises(placement.ConfigError, match="llama-3.1-8b"):
        read_config("llama-3.1-8")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(placement.ConfigError, match="config.json: malformed JSON"):
        read_config(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(placement.ConfigError, match="config.json: expected a JSON object"):
        read_config(str(tmp_path))                                    # a directory: its config.json


# ---- streamed bytes per step against the Architecture's own counts -------------------------------------
def test_plan_bytes_per_step_counts_what_a_step_streams():
    spec = placement.load_spec("llama-3.1-8b")
    arch, workload = spec.arch, placement.Workload(batch_size=4, prompt_len=100, gen_len=28)
    size = placement.DTYPE_BYTES[spec.dtype]
    layer_bytes = size * sum(_numel(s) for s in arch.layer_tensors(0).values())
    head_bytes = size * _numel(arch.lm_head_tensors()["lm_head.weight"])
    all_streamed = placement.manual_plan(spec, workload, gpu_layers=0)
    assert offload_decode.plan_bytes_per_step(all_streamed) == 32 * layer_bytes + head_bytes
    resident = placement.manual_plan(spec, workload)
    assert offload_decode.plan_bytes_per_step(resident) == 0
    # KV on the CPU attended by the GPU: the whole preallocated cache (B x (prompt + gen)) crosses each step
    kv_through_ring = placement.manual_plan(spec, workload, kv_gpu_layers=0, cpu_attention=False)
    kv_per_token = 2 * arch.num_kv_heads * arch.head_dim * size
    assert offload_decode.plan_bytes_per_step(kv_through_ring) == 32 * 4 * 128 * kv_per_token


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


# ---- the scripts, as a user runs them -----------------------------------------------------------------
def test_offload_decode_quick_prints_every_column(tmp_path):
    result = run_script("benchmarks/offload_decode.py", "--quick", "--workdir", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "ours tok/s" in out and "bound" in out and "peer tok/s" in out and "meas/pred" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["16"])]
    assert [r[0] for r in rows] == ["1", "16"], out
    assert all("n/a:" not in " ".join(r) for r in rows), out           # both batch sizes ran
    assert "streamed" in out and "WARNING: nothing is streamed" not in out
    if not torch.cuda.is_available():
        assert "NOT A GPU RESULT" in out


def test_offload_decode_bad_config_exits_2_with_one_line(tmp_path):
    result = run_script("benchmarks/offload_decode.py", "--config", tmp_path / "nope.json", "--workdir", tmp_path)
    assert result.returncode == 2
    assert "nope.json: no such file" in result.stderr and "Traceback" not in result.stderr
    result = run_script("benchmarks/offload_decode.py", "--quick", "--gpu-memory", "lots")
    assert result.returncode == 2 and "--gpu-memory" in result.stderr and "Traceback" not in result.stderr


def test_offload_decode_budget_too_small_prints_why_and_exits_2(tmp_path):
    result = run_script("benchmarks/offload_decode.py", "--quick", "--gpu-memory", "1MiB", "--batch-sizes", "1",
                        "--no-peer", "--workdir", tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "n/a: PlanError" in result.stdout and "short: the GPU budget" in result.stdout
    assert "did not load" in result.stderr and "Traceback" not in result.stderr


def test_cpu_attention_quick_runs():
    # --seq-lens 1024 keeps it to two shapes per dtype (the test's time budget); every dtype still runs
    result = run_script("benchmarks/cpu_attention.py", "--quick", "--repeats", "1", "--seq-lens", "1024")
    assert result.returncode == 0, result.stderr[-3000:]
    for dtype in ("float32", "bfloat16", "float16"):
        assert any(line.startswith(dtype) for line in result.stdout.splitlines()), result.stdout


def test_generate_cpu_runs():
    # it has no --quick; its own short settings. --new-tokens >= 8: the script checks 8 tokens for parity
    result = run_script("benchmarks/generate_cpu.py", "--prompt-len", "8", "--new-tokens", "8", "--repeats", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ratio offload / transformers" in result.stdout


def test_speculative_decode_quick_runs():
    result = run_script("benchmarks/speculative_decode.py", "--quick", "--repeats", "1", "--new-tokens", "12",
                        "--dtype", "float32", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("streamed", "resident"))]
    assert len(rows) == 8 and all(row[-1] == "yes" for row in rows), result.stdout     # float32: plain greedy
    assert {row[4] for row in rows} == {"ngram", "n-tree", "int4", "i-tree"}            # chains and trees
    assert "CPU (standing in for the GPU: no CUDA)" in result.stdout
    assert "a pass of the budget / of 9 tokens costs" in result.stdout


def test_bandwidth_on_this_machine():
    bandwidth = measure_host_to_device_bandwidth("cpu", num_bytes=1 << 20, num_repeats=2)
    assert bandwidth.bytes_per_second > 0 and bandwidth.best_bytes_per_second >= bandwidth.bytes_per_second
    assert "not a PCIe figure" in str(bandwidth)
    assert bandwidth.seconds_for(2 * bandwidth.num_bytes) == pytest.approx(2 * bandwidth.seconds_for(bandwidth.num_bytes))
    with pytest.raises(ValueError):
        measure_host_to_device_bandwidth("cpu", num_bytes=0)


@pytest.mark.cuda
def test_pinned_bandwidth_on_cuda():
    bandwidth = measure_host_to_device_bandwidth("cuda", num_bytes=64 << 20, num_repeats=3)
    assert bandwidth.is_pinned and bandwidth.description.startswith("pinned host -> cuda")
    assert bandwidth.bytes_per_second > 0


def test_cpu_decode_quick_prints_every_row():
    pytest.importorskip("transformers")
    result = run_script("benchmarks/cpu_decode.py", "--quick", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "memory read bandwidth" in out and "ours tok/s" in out and "of BW" in out
    decode, prefill = out.split("\nprefill: a 128-token prompt")
    rows = [line for line in decode.splitlines() if line.startswith("SmolLM2-135M")]
    assert [row.split()[1] for row in rows] == ["bf16", "int8", "int4"], out
    assert all(float(row.split()[3 if "(GGUF)" not in row else 4]) > 0 for row in rows), out
    rows = [line for line in prefill.split("\nhybrid plans")[0].splitlines() if line.startswith("SmolLM2-135M")]
    assert [row.split()[1] for row in rows] == ["bf16", "int8", "int4"], out
    assert all(float(row.split()[2 if "(GGUF)" not in row else 3]) > 0 for row in rows), out     # ours
    assert float(rows[0].split()[3]) > 0, out                                                     # transformers


def test_moe_decode_quick_prints_every_row(tmp_path):
    pytest.importorskip("transformers")
    result = run_script("benchmarks/moe_decode.py", "--quick", "--workdir", tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "memory read bandwidth" in out and "meas/pred" in out
    assert torch.cuda.is_available() or "no CUDA: the 'gpu' tier is the CPU" in out
    rows = [line for line in out.splitlines() if line.startswith("bf16 ")]
    assert len(rows) == 4 and all(float(row.split()[-4]) > 0 for row in rows), out      # ours tok/s
    assert float(rows[-1].split()[-1]) > 0, out                                          # transformers
    assert "GB/s" in out.splitlines()[-1] and "of" in out.splitlines()[-1], out


def test_serve_throughput_runs_and_prints_every_column():
    out = run_script(REPO / "benchmarks" / "serve_throughput.py", "--clients", 1, 2, "--requests", 1,
                     "--max-tokens", 8, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    header = next(line for line in out.stdout.splitlines() if line.lstrip().startswith("clients"))
    assert header.split() == ["clients", "tokens", "seconds", "tok/s", "all", "tok/s", "each", "one", "at", "a",
                              "time", "ratio", "rows/pass", "tok/pass", "H2D", "MB/token"]
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2"] and all(row[6].endswith("x") for row in rows)
    assert ("no CUDA" in out.stdout) != torch.cuda.is_available()
