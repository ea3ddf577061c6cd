"""Hugging Face Hub names as MODEL: from a Hub cache built in a temp folder with HF_HUB_OFFLINE=1, and from a
local stand-in for the Hub's HTTP API (fake_hub.py) for what needs the network: reading headers without the
weights, downloading only what we read, and the Hub's errors. No test here reaches the real Hub."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from placement.hub import HubError, HubName
from tests.examples.builders import demo_model_dir
from tests.offload.loading.test_gguf import smollm2_path

from .fake_hub import FakeHub, add_to_cache, repo_files
from .run import one_error_line, run_offload

BUDGET = ["--gpu-memory", "1GiB", "--cpu-memory", "2GiB"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return demo_model_dir(tmp_path_factory.mktemp("hub") / "tiny")


@pytest.fixture(scope="module")
def offline(tmp_path_factory, tiny):
    """A Hub cache holding org/tiny (a safetensors checkpoint with its tokenizer) and org/smol-GGUF (the real
    SmolLM2 file under two quantization names, both links to one blob), and the environment that uses it."""
    cache = tmp_path_factory.mktemp("cache") / "hub"
    add_to_cache(cache, "org/tiny", repo_files(tiny))
    add_to_cache(cache, "org/smol-GGUF", {"SmolLM2-135M-Instruct-Q4_1.gguf": smollm2_path(),
                                          "SmolLM2-135M-Instruct-Q8_0.gguf": smollm2_path()})
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache.parent / "home")}


@pytest.mark.parametrize("text, repo_id, quant", [
    ("Qwen/Qwen3-8B", "Qwen/Qwen3-8B", None), ("unsloth/Qwen3-8B-GGUF:q4_k_m", "unsloth/Qwen3-8B-GGUF", "q4_k_m"),
    ("org/name.v2:Q8_0", "org/name.v2", "Q8_0"), ("./models/x", None, None), ("a/b/c", None, None),
    ("llama-3.1-8b", None, None), ("../x/y", None, None), ("org/x:", None, None)])
def test_hub_names(text, repo_id, quant):
    name = HubName.parse(text)
    assert (name.repo_id, name.quant) == (repo_id, quant) if repo_id else name is None


GGUF_REPO = ["README.md", "Qwen3-8B-Q4_K_M.gguf", "Qwen3-8B-Q8_0.gguf", "Qwen3-8B-IQ4_XS.gguf", "mmproj-F16.gguf",
             "Qwen3-8B-BF16-00001-of-00002.gguf", "Qwen3-8B-BF16-00002-of-00002.gguf"]
SAFETENSORS_REPO = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                    "model.safetensors.index.json", "tokenizer.json", "consolidated.safetensors", "original/x.pth"]


def test_file_selection_follows_llama_cpp():
    select = lambda text, files: HubName.parse(text).select(files)          # noqa: E731
    assert select("u/Qwen3-8B-GGUF:q8_0", GGUF_REPO).gguf == "Qwen3-8B-Q8_0.gguf"       # any case
    assert select("u/Qwen3-8B-GGUF:IQ4_XS", GGUF_REPO).gguf == "Qwen3-8B-IQ4_XS.gguf"
    assert select("u/Qwen3-8B-GGUF", GGUF_REPO).gguf == "Qwen3-8B-Q4_K_M.gguf"         # llama.cpp's default
    assert select("u/one", ["a/model-F16.gguf"]).gguf == "a/model-F16.gguf"
    checkpoint = select("u/Qwen3-8B", SAFETENSORS_REPO + ["model-Q4_K_M.gguf"])       # a checkpoint wins
    assert checkpoint.gguf is None and checkpoint.files == (
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json")
    errors = {"u/Qwen3-8B-GGUF:Q5_K_S": "has no Q5_K_S file; it has BF16, IQ4_XS, Q4_K_M, Q8_0",
              "u/Qwen3-8B-GGUF:BF16": "one part of a split GGUF file; merge the parts",
              "u/Qwen3-8B:Q4_K_M": "has no .gguf files",
              "u/docs": "has no model files this library reads"}
    for text, message in errors.items():
        with pytest.raises(HubError, match=message):
            select(text, GGUF_REPO if "GGUF" in text else SAFETENSORS_REPO if "8B" in text else ["README.md"])
    with pytest.raises(HubError, match="holds 2 GGUF files; pick one with u/two:QUANT, QUANT one of Q5_0, Q8_0"):
        select("u/two", ["m-Q8_0.gguf", "m-Q5_0.gguf"])


def test_a_cached_checkpoint_runs_offline_as_its_folder(tiny, offline):
    prompt = ["--prompt", "Hello there", "--max-new-tokens", "6"]
    from_folder = run_offload("generate", tiny, *prompt)
    from_cache = run_offload("generate", "org/tiny", *prompt, env=offline)
    assert from_folder.returncode == 0 and from_cache.returncode == 0, from_cache.stderr
    assert from_cache.stdout == from_folder.stdout and from_cache.stdout.strip()
    plan = run_offload("plan", "org/tiny", *BUDGET, env=offline)
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.startswith("model     org/tiny (llama, ")


def test_a_cached_gguf_file_is_picked_by_its_quantization(offline):
    plan = run_offload("plan", "org/smol-GGUF:q8_0", *BUDGET, env=offline)
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.startswith("model     SmolLM2-135M-Instruct-Q8_0 (llama, ")
    out = run_offload("chat", "org/smol-GGUF:Q4_1", "--temperature", 0, "--max-new-tokens", 12, env=offline,
                      stdin="What is the capital of France?\n")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    error = one_error_line(run_offload("plan", "org/smol-GGUF", *BUDGET, env=offline), "offload plan")
    assert "holds 2 GGUF files; pick one with org/smol-GGUF:QUANT, QUANT one of Q4_1, Q8_0" in error


@pytest.mark.parametrize("command", ["chat", "generate", "plan", "quantize"])
def test_a_name_missing_from_the_cache_offline_is_one_line(offline, command, tmp_path):
    args = {"chat": [], "generate": ["--prompt", "hi"], "plan": BUDGET, "quantize": [tmp_path / "out"]}[command]
    error = one_error_line(run_offload(command, "org/absent", *args, env=offline), f"offload {command}")
    assert "org/absent: not in the Hugging Face cache" in error and "HF_HUB_OFFLINE" in error


def test_load_takes_a_cached_hub_name(tiny, offline, monkeypatch):
    import huggingface_hub.constants
    import offload
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", offline["HF_HUB_CACHE"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompt = [[1, 5, 9, 14, 3]]
    by_name = offload.load("org/tiny", device="cpu", progress=False)
    by_folder = offload.load(tiny, device="cpu", progress=False)
    assert by_name.generate(prompt, max_new_tokens=5) == by_folder.generate(prompt, max_new_tokens=5)
    assert torch.equal(by_name.forward(prompt), by_folder.forward(prompt))
    by_name.close()
    by_folder.close()


@pytest.fixture
def hub(tiny, tmp_path):
    """The fake Hub serving org/tiny, org/gated, org/docs (a README only) and org/smol-GGUF (the real SmolLM2
    file), and an empty cache."""
    docs, gguf_repo = tmp_path / "docs", tmp_path / "smol-GGUF"
    docs.mkdir()
    (docs / "README.md").write_text("no weights here")
    gguf_repo.mkdir()
    (gguf_repo / "SmolLM2-135M-Instruct-Q4_1.gguf").symlink_to(smollm2_path())
    server = FakeHub({"org/tiny": tiny, "org/gated": tiny, "org/docs": docs, "org/smol-GGUF": gguf_repo},
                     gated=("org/gated",))
    env = {"HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    yield server, env
    server.close()


def test_plan_reads_headers_without_downloading_the_weights(hub, tiny):
    server, env = hub
    out = run_offload("plan", "org/tiny", *BUDGET, env=env)
    assert out.returncode == 0, out.stderr
    local = run_offload("plan", tiny, *BUDGET)
    assert out.stdout.replace("org/tiny", "tiny", 1) == local.stdout       # the same exact bytes, the same plan
    weights = [(method, ranged) for method, path, ranged in server.requests if path.endswith(".safetensors")]
    assert weights and all(method == "HEAD" or ranged for method, ranged in weights), weights
    assert not list(Path(env["HF_HUB_CACHE"]).rglob("*.safetensors"))


def test_plan_reads_a_gguf_files_header_without_downloading_it(hub, tmp_path):
    server, env = hub
    out = run_offload("plan", "org/smol-GGUF", *BUDGET, env=env)
    assert out.returncode == 0, out.stderr
    renamed = tmp_path / "SmolLM2-135M-Instruct-Q4_1.gguf"
    renamed.symlink_to(smollm2_path())
    assert out.stdout == run_offload("plan", renamed, *BUDGET).stdout
    fetched = [(method, ranged) for method, path, ranged in server.requests if path.endswith(".gguf")]
    begins_ends = [tuple(map(int, ranged.removeprefix("bytes=").split("-"))) for _, ranged in fetched]
    assert sum(end + 1 - begin for begin, end in begins_ends) < smollm2_path().stat().st_size / 10, fetched
    assert not list(Path(env["HF_HUB_CACHE"]).rglob("*.gguf"))


def test_a_name_is_downloaded_once_then_read_from_the_cache(hub, tiny):
    server, env = hub
    prompt = ["--prompt", "Hello there", "--max-new-tokens", "6"]
    first = run_offload("generate", "org/tiny", *prompt, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout == run_offload("generate", tiny, *prompt).stdout
    fetched = {path.rsplit("/", 1)[-1] for method, path, _ in server.requests if method == "GET" and "/resolve/" in path}
    assert fetched == {p.name for p in tiny.iterdir()}
    server.requests.clear()
    again = run_offload("generate", "org/tiny", *prompt, env=env)
    assert again.stdout == first.stdout and server.requests == []                # the cache, no network


@pytest.mark.parametrize("name, message", [
    ("org/missing", "not a local path, and no model org/missing on the Hugging Face Hub"),
    ("org/gated", "org/gated is gated: accept its terms on https://huggingface.co/org/gated and log in"),
    ("org/docs", "org/docs has no model files this library reads")])
def test_hub_errors_are_one_line(hub, name, message):
    _, env = hub
    for command, args in (("chat", []), ("plan", BUDGET)):
        assert message in one_error_line(run_offload(command, name, *args, env=env), f"offload {command}")


def test_an_unreachable_hub_is_one_line(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    error = one_error_line(run_offload("generate", "org/tiny", "--prompt", "hi", env=env), "offload generate")
    assert "org/tiny: could not reach the Hugging Face Hub" in error and "check the connection" in error
