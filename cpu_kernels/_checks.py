"""Input validation and zero-copy numpy views for the torch-facing wrappers."""
import numpy as np
import torch

CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def require_tensor(name: str, value, rank: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got {_describe(value)}")
    if value.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(value.shape)}")
    return value


def check_caches(k_cache, v_cache) -> None:
    """Caches: [B, Hkv, S_max, D], identical shape and dtype (float32/bfloat16/float16), contiguous."""
    require_tensor("k_cache", k_cache, 4)
    require_tensor("v_cache", v_cache, 4)
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache must match in shape and dtype, got k_cache "
                         f"{_describe(k_cache)} and v_cache {_describe(v_cache)}")
    if k_cache.dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be float32, bfloat16 or float16, got {_describe(k_cache)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernels read it in place, never copy it), "
                             f"got shape {tuple(cache.shape)} with strides {cache.stride()}")
    if min(k_cache.shape) == 0:
        raise ValueError(f"caches must not be empty, got shape {tuple(k_cache.shape)}")


def row_vector(name: str, value, num_rows: int) -> np.ndarray:
    """An integer [B] tensor/array/sequence -> int64 numpy array (a copy of B numbers)."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {_describe(value)}")
        array = value.detach().cpu().numpy().astype(np.int64)
    else:
        array = np.asarray(value)
        if array.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
        array = array.astype(np.int64)
    if array.shape != (num_rows,):
        raise ValueError(f"{name} must have shape ({num_rows},) (one entry per batch row), "
                         f"got {tuple(array.shape)}")
    return np.ascontiguousarray(array)


def cache_view(cache: torch.Tensor, fp16_as_int16: bool) -> np.ndarray:
    """Zero-copy numpy view of a cache: float32 as is, 16-bit caches as their bit patterns.

    bfloat16 -> uint16; float16 -> int16 when `fp16_as_int16` (the attention kernel picks its widening
    by element type), else uint16.
    """
    if cache.dtype == torch.float32:
        view = cache.numpy()
    else:
        view = cache.view(torch.int16).numpy()
        if cache.dtype == torch.bfloat16 or not fp16_as_int16:
            view = view.view(np.uint16)
    assert view.ctypes.data == cache.data_ptr(), "cache view must alias the tensor (no copy)"
    return view
