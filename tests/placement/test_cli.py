"""offload-plan through a real subprocess: output, JSON, every bad input, and no torch on the way."""
import json
import re
import subprocess
import sys

import pytest

from placement import Plan, load_spec

GiB = 1 << 30


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "placement", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_human_output():
    r = run("llama-3.1-8b", "--gpu", "rtx-4070", "--gpu-memory", "8GiB", "--cpu-memory", "16GiB",
            "--prompt-len", "1024", "--gen-len", "128")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for expected in ("llama-3.1-8b", "8.00 GiB", "16.00 GiB", "layers", "weights", "kv cache", "buffers",
                     "workspace", "total", "budget", "predicted prefill", "tokens/s", "decode on"):
        assert expected in out
    assert "Traceback" not in r.stderr
    # some layers decode on the CPU (auto): the CPU's work balances the PCIe copies of the streamed rest
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0][0].isdigit()]
    assert any(row[5] == "cpu" for row in rows) and "bottleneck: cpu" in out
    off = run("llama-3.1-8b", "--gpu", "rtx-4070", "--gpu-memory", "8GiB", "--cpu-memory", "16GiB",
              "--prompt-len", "1024", "--gen-len", "128", "--cpu-compute", "off")
    rows = [line.split() for line in off.stdout.splitlines() if line.split()[:1] and line.split()[0][0].isdigit()]
    assert rows and all(row[5] == "gpu" for row in rows) and "bottleneck: pcie" in off.stdout


def test_json_output_round_trips():
    r = run("opt-350m", "--gpu-memory", "1GiB", "--cpu-memory", "8GiB", "--batch-size", "4",
            "--prompt-len", "256", "--gen-len", "32", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["budget"] == {"gpu_bytes": GiB, "cpu_bytes": 8 * GiB}
    assert d["workload"] == {"batch_size": 4, "prompt_len": 256, "gen_len": 32}
    spec = load_spec("opt-350m")
    assert d["memory"]["gpu"]["weights"] + d["memory"]["cpu"]["weights"] == spec.total_weight_bytes
    assert Plan.from_json(r.stdout).to_dict() == d


def test_manual_flags_and_dtype():
    r = run("llama-2-7b", "--gpu-memory", "6GiB", "--cpu-memory", "16GiB", "--gpu-layers", "8",
            "--kv-gpu-layers", "0", "--dtype", "bf16", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [l["weights"] for l in d["layers"]].count("gpu") == 8
    assert all(l["kv"] == "cpu" for l in d["layers"]) and d["model"]["dtype"] == "bfloat16"


def test_list_presets():
    r = run("--list-presets")
    assert r.returncode == 0
    for name in ("llama-3.1-8b", "qwen2.5-72b", "opt-350m", "mistral-nemo-12b"):
        assert name in r.stdout


def test_config_path_and_checkpoint_dir(tmp_path):
    from .helpers import REFERENCE_CONFIGS
    r = run(str(REFERENCE_CONFIGS / "tinyllama-1.1b.json"), "--gpu-memory", "2GiB", "--cpu-memory", "4GiB")
    assert r.returncode == 0, r.stderr
    (tmp_path / "config.json").write_text((REFERENCE_CONFIGS / "opt-6.7b.json").read_text())
    r = run(str(tmp_path), "--gpu-memory", "4GiB", "--cpu-memory", "20GiB", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"]["num_params"] == 6_658_473_984


def _bad_inputs(tmp_path):
    (tmp_path / "malformed").mkdir()
    (tmp_path / "malformed" / "config.json").write_text("{ not json")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 12}))
    (tmp_path / "empty").mkdir()
    budget = ["--gpu-memory", "8GiB", "--cpu-memory", "16GiB"]
    return {
        "unknown preset": (["llama-3.1-8bb", *budget], "did you mean llama-3.1-8b"),
        "missing path": ([str(tmp_path / "nope"), *budget], "no such file or directory"),
        "missing config.json": ([str(tmp_path / "empty"), *budget], "config.json: not found"),
        "malformed config.json": ([str(tmp_path / "malformed"), *budget], "malformed JSON"),
        "unsupported model_type": ([str(tmp_path / "gpt2"), *budget], "unsupported model_type 'gpt2'"),
        "bad gpu size": (["llama-3.1-8b", "--gpu-memory", "8 gigs", "--cpu-memory", "16GiB"], "--gpu-memory"),
        "bad cpu size": (["llama-3.1-8b", "--gpu-memory", "8GiB", "--cpu-memory", "lots"], "--cpu-memory"),
        "zero prompt": (["llama-3.1-8b", *budget, "--prompt-len", "0"], "--prompt-len"),
        "negative gen": (["llama-3.1-8b", *budget, "--gen-len", "-5"], "--gen-len"),
        "zero batch": (["llama-3.1-8b", *budget, "--batch-size", "0"], "--batch-size"),
        "word batch": (["llama-3.1-8b", *budget, "--batch-size", "two"], "--batch-size"),
        "bad dtype": (["llama-3.1-8b", *budget, "--dtype", "int4"], "unsupported dtype"),
        "unknown gpu": (["llama-3.1-8b", "--gpu", "rtx-9999", "--cpu-memory", "16GiB"], "unknown GPU"),
        "does not fit": (["llama-2-70b", "--gpu-memory", "8GiB", "--cpu-memory", "16GiB"], "does not fit"),
        "manual over budget": (["llama-2-70b", "--gpu-memory", "8GiB", "--cpu-memory", "200GiB",
                                "--gpu-layers", "40"], "needs"),
        "no model": (["--gpu-memory", "8GiB"], "MODEL is required"),
        "unknown flag": (["llama-3.1-8b", "--gpu-memroy", "8GiB"], "unrecognized"),
        "profile with --gpu": (["llama-3.1-8b", "--gpu", "t4", "--profile"], "--profile"),
        "unknown quantization": (["llama-3.1-8b", *budget, "--quantize", "int3"], "unknown quantization 'int3'"),
        "group that does not divide": (["llama-3.1-8b", *budget, "--quantize", "int4-g100"],
                                       "group_size 100 does not divide"),
    }


@pytest.mark.parametrize("case", [
    "unknown preset", "missing path", "missing config.json", "malformed config.json",
    "unsupported model_type", "bad gpu size", "bad cpu size", "zero prompt", "negative gen",
    "zero batch", "word batch", "bad dtype", "unknown gpu", "does not fit", "manual over budget",
    "no model", "unknown flag", "profile with --gpu", "unknown quantization", "group that does not divide"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    args, message = _bad_inputs(tmp_path)[case]
    r = run(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if not line.startswith("offload-plan: warning:")]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith("offload-plan: error: ")
    assert message in errors[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_warns_when_budgets_exceed_this_machine():
    r = run("qwen2.5-0.5b", "--gpu-memory", "4096GiB", "--cpu-memory", "4096GiB", "--prompt-len", "64",
            "--gen-len", "8")
    assert r.returncode == 0
    assert "warning: --cpu-memory 4.00 TiB exceeds this machine" in r.stderr
    assert "warning: --gpu-memory 4.00 TiB exceeds this machine" in r.stderr


def test_planning_imports_no_torch():
    code = ("import sys, placement, placement.cli\n"
            "rc = placement.cli.main(['llama-2-70b', '--gpu-memory', '24GiB', '--cpu-memory', '192GiB',"
            " '--json'])\n"
            "assert rc == 0, rc\n"
            "plan = placement.plan(placement.load_spec('qwen2.5-7b'),"
            " placement.Hardware.detect(gpu_memory='8GiB', cpu_memory='32GiB'), placement.Workload())\n"
            "assert 'torch' not in sys.modules, 'placement imported torch'\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


def test_console_script_is_installed():
    import shutil
    exe = shutil.which("offload-plan")
    if exe is None:
        pytest.skip("offload-plan is not on PATH (package not installed with pip install -e .)")
    r = subprocess.run([exe, "opt-125m", "--gpu-memory", "2GiB", "--cpu-memory", "4GiB"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "opt-125m" in r.stdout


def test_warns_when_gpu_memory_exceeds_the_named_card(capsys):
    # the card is named as gpu_preset() reads names (any case, '_' for '-'), not only by its exact key
    from placement.cli import main
    assert main(["qwen2.5-0.5b", "--gpu", "RTX_4090", "--gpu-memory", "32GiB", "--cpu-memory", "16GiB",
                 "--prompt-len", "64", "--gen-len", "8"]) == 0
    assert "warning: --gpu-memory 32.00 GiB exceeds the 24.00 GiB of a RTX_4090" in capsys.readouterr().err


def test_quantize_flag_plans_the_packed_bytes():
    args = ["llama-3.1-70b", "--gpu", "rtx-4090", "--cpu-memory", "64GiB"]
    assert run(*args).returncode == 2                                   # bfloat16 does not fit
    out = run(*args, "--quantize", "int4", "--json")
    assert out.returncode == 0, out.stderr
    plan = Plan.from_json(out.stdout)
    assert plan.quantization == "int4"
    assert plan.layers[0].weight_bytes == load_spec("llama-3.1-70b", quantization="int4").layer_weight_bytes(0)
    assert "layers quantized int4" in run(*args, "--quantize", "int4").stdout


def test_experts_flag_places_a_moe_models_experts():
    args = ("qwen3-30b-a3b", "--quantize", "int4", "--gpu", "rtx-3060", "--cpu-memory", "32GiB")
    auto = run(*args)
    assert auto.returncode == 0, auto.stderr
    rows = [line.split() for line in auto.stdout.splitlines() if line.split()[:1] and line.split()[0][0].isdigit()]
    # the first layers' experts on the GPU, the others' in RAM computed there (a desktop CPU with dual-channel
    # DDR4 reads the routed experts faster than the card's PCIe 4.0 link copies them) and a predicted speed
    assert [row[6] for row in rows] == ["gpu", "cpu"] and "experts" in auto.stdout
    assert re.search(r"decode \d+\.\d+ tokens/s", auto.stdout)
    on_cpu = json.loads(run(*args, "--experts", "cpu", "--json").stdout)
    assert all(layer["experts"] == "cpu" for layer in on_cpu["layers"])
    assert on_cpu["memory"]["cpu"]["weights"] == sum(layer["expert_bytes"] for layer in on_cpu["layers"])
    manual = json.loads(run(*args, "--gpu-layers", "40", "--experts", "cpu", "--json").stdout)
    assert [layer["experts"] for layer in manual["layers"]] == ["cpu"] * 48
    dense = run("llama-3.1-8b", "--experts", "cpu")
    assert dense.returncode == 2 and "has none: leave --experts out" in dense.stderr and "Traceback" not in dense.stderr
