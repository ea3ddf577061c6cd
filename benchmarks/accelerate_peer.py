"""The peer of the offload benchmarks: transformers + accelerate with device_map="auto" and a max_memory.

`load_peer(path, dtype, max_memory)` returns a Peer, or a one-line reason why it cannot run (the `bench`
extra missing, an error while loading): callers print "n/a" with that reason and go on. The checkpoint is
read from its local folder only (`local_files_only=True`, no hub access).
`decode_rate` times generate the way the offload benchmarks time ours: (N - 1) * B / (t(N) - t(1)) over
greedy calls producing exactly N and exactly 1 new tokens, min over repeats, so prefill cancels out.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class Peer:
    model: object                  # a transformers PreTrainedModel
    description: str               # how it was run, one line: "transformers 5.x + accelerate 1.x, ..."
    device_map: dict               # module name -> "cpu" / 0 / "disk" (accelerate's hf_device_map)
    input_device: torch.device     # where input ids go (accelerate's hooks move them along)

    def generate(self, prompts: list[list[int]], num_new_tokens: int) -> list[list[int]]:
        """Greedy, exactly `num_new_tokens` new ids per row (prompts of equal length, no padding)."""
        ids = torch.tensor(prompts, device=self.input_device)                   # [B, T]
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_new_tokens,
                                      min_new_tokens=num_new_tokens, do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()                                    # [B, N]; syncs the device

    def placement_counts(self) -> str:
        """'12 modules on gpu 0, 20 on cpu' from accelerate's device map."""
        counts: dict[str, int] = {}
        for where in self.device_map.values():
            key = f"gpu {where}" if isinstance(where, int) else str(where)
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{n} module(s) on {k}" for k, n in counts.items()) or "all on cpu"


def load_peer(path, dtype: torch.dtype, max_memory: dict, offload_folder) -> Peer | str:
    """Load `path` with device_map="auto" and `max_memory`; a Peer, or the reason it cannot run."""
    try:
        import accelerate
        import transformers
    except ImportError as e:
        return f"transformers/accelerate not installed ({e.name}); pip install -e .[bench]"
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=dtype, device_map="auto", max_memory=max_memory,
            offload_folder=str(offload_folder))
    except Exception as e:  # noqa: BLE001 - any failure of the peer is reported, not fatal
        return f"transformers could not load it: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    model.eval()
    device_map = dict(getattr(model, "hf_device_map", None) or {"": "cpu"})
    on_gpu = [w for w in device_map.values() if isinstance(w, int)]
    # with a GPU in the map, accelerate executes every module there (offloaded ones are copied in by hooks)
    input_device = torch.device(f"cuda:{min(on_gpu)}" if on_gpu else "cpu")
    description = (f"transformers {transformers.__version__} + accelerate {accelerate.__version__}, "
                   f'device_map="auto", max_memory={_format_memory(max_memory)}')
    return Peer(model=model, description=description, device_map=device_map, input_device=input_device)


def decode_rate(generate, prompts: list[list[int]], num_new_tokens: int, repeats: int) -> tuple[float, list]:
    """(decode tokens/s summed over rows, the last N-token output) of generate(prompts, n) -> rows."""
    generate(prompts, 2)                                                          # warm-up
    t_one, t_all, out = [], [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(prompts, 1)
        t_one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = generate(prompts, num_new_tokens)
        t_all.append(time.perf_counter() - t0)
    steps = (num_new_tokens - 1) * len(prompts)
    return steps / max(min(t_all) - min(t_one), 1e-9), out


def _format_memory(max_memory: dict) -> str:
    return "{" + ", ".join(f"{k!r}: {v / 2**30:.2f} GiB" for k, v in max_memory.items()) + "}"
