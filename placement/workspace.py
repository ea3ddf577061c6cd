"""`workspace_bytes`: a conservative bound on the GPU activation memory of one forward chunk.

The runtime relies on it: a plan reserves `workspace_bytes(arch, batch_size, prefill_chunk_size,
max_seq_len, dtype)` on the GPU for activations, and the runtime prefills in chunks of at most
`prefill_chunk_size` tokens per row so its peak stays inside. Decode (B rows, 1 token each) is the
same formula with chunk 1 and is therefore always covered by the prefill bound.

Terms, with N = B x chunk rows, S = max_seq_len, b = bytes of the model dtype, all summed as if alive
at once (they are not: the sum is the conservative part):
- hidden state, residual and normed input: 3 N H b (+ N E b for OPT's word_embed_proj_dim E)
- q, k, v and their rotated copies: 2 N (Hq + 2 Hkv) D b; RoPE cos/sin: 2 N D 4
- GQA keys/values expanded to all query heads over the whole context: 2 B Hq S D b (the runtime asks SDPA
  for `enable_gqa`, but its math path, taken with a mask, may still expand them)
- attention output: N Hq D b
- MLP intermediates (gate, up, their product; OPT fc1 and its activation): 3 N I b
- SDPA scores B x Hq x chunk x S and the mask B x chunk x S, both float32 (float32 scores also bound
  16-bit scores plus probabilities on the math path); with soft-capped scores (Gemma 2), computed outside
  SDPA, also their float32 softmax and its cast
- logits of the last positions: B x V in float32 plus B x V in the model dtype, or of the MAX_VERIFY_TOKENS
  positions a speculative decoding pass verifies (one row), when more
- with quantized weights, the largest matrix dequantized: [out, in] codes (1 byte) + twice the model dtype, a
  matrix of more than DEQUANT_MAX_WEIGHTS weights (a large vocabulary's packed LM head) in chunks of rows
  (`dequant_rows`), each chunk's product [N, rows] in the model dtype before it joins the output
- ALLOCATOR_SLACK_BYTES for allocator rounding and small temporaries
"""
from __future__ import annotations

from .architecture import DTYPE_BYTES, Architecture, normalize_dtype

ALLOCATOR_SLACK_BYTES = 64 << 20
MAX_VERIFY_TOKENS = 16            # positions one speculative decoding pass verifies at most (their logits)
DEFAULT_VERIFY_TOKENS = 9         # a pass's positions where no cost model says (a plan from an older JSON)
DEQUANT_MAX_WEIGHTS = 1 << 25      # a packed matrix is dequantized at most this many weights at a time


def dequant_rows(shape: tuple[int, int]) -> int:
    """How many rows of a packed matrix [out, in] are dequantized at a time next to its matmul: all of them
    up to DEQUANT_MAX_WEIGHTS weights (every layer matrix of a 14B model), else chunks of that size."""
    out, in_features = shape
    return max(1, min(out, DEQUANT_MAX_WEIGHTS // in_features))


def workspace_bytes(arch: Architecture, batch_size: int, chunk_tokens: int, max_seq_len: int,
                    dtype: str, quantized_shapes=()) -> int:
    """Upper bound on GPU activation bytes of one chunk of `chunk_tokens` tokens per row for
    `batch_size` rows attending over up to `max_seq_len` positions (see the module docstring)."""
    if min(batch_size, chunk_tokens, max_seq_len) <= 0:
        raise ValueError(f"workspace_bytes needs positive sizes, got batch_size={batch_size}, "
                         f"chunk_tokens={chunk_tokens}, max_seq_len={max_seq_len}")
    b = DTYPE_BYTES[normalize_dtype(dtype)]
    B, C, S = batch_size, min(chunk_tokens, max_seq_len), max_seq_len
    N = B * C
    H, D, I, V = arch.hidden_size, arch.head_dim, arch.intermediate_size, arch.vocab_size
    Hq, Hkv = arch.num_heads, arch.num_kv_heads
    hidden = 3 * N * H * b + (N * arch.embed_dim * b if arch.embed_dim != H else 0)
    qkv = 2 * N * (Hq + 2 * Hkv) * D * b + 2 * N * D * 4
    gqa = 2 * B * Hq * S * D * b if Hq != Hkv else 0
    attn_out = N * Hq * D * b
    mlp = 3 * N * I * b
    scores = B * Hq * C * S * 4 + B * C * S * 4
    if arch.attn_logit_softcap is not None:   # soft-capped scores are computed out of SDPA: + their softmax
        scores += B * Hq * C * S * (4 + b)
    logits = max(B, MAX_VERIFY_TOKENS) * V * (4 + b)
    # quantized matrices are dequantized one at a time next to their matmul (a large one a chunk of rows at a
    # time): the unpacked codes (1 byte), the codes in the model dtype and the weight; a chunk's product
    dequant = max((dequant_rows(shape) * shape[1] for shape in quantized_shapes), default=0) * (1 + 2 * b)
    dequant += max((N * dequant_rows(shape) * b for shape in quantized_shapes if dequant_rows(shape) < shape[0]),
                   default=0)
    return hidden + qkv + gqa + attn_out + mlp + scores + logits + dequant + ALLOCATOR_SLACK_BYTES
