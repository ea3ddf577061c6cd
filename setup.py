from setuptools import find_packages, setup

setup(
    name="offload",
    version="0.1.0",
    description="Run large language models on a GPU too small for them: planned placement, "
    "weights streamed over PCIe with prefetch, attention where the KV cache lives.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["offload", "offload.*", "placement", "placement.*",
                                    "cpu_kernels", "cpu_kernels.*"]),
    package_data={"placement": ["presets/*.json"]},
    install_requires=[
        "torch>=2.5",          # SDPA enable_gqa
        "safetensors>=0.4",
        "psutil>=5.9",
        "numba>=0.59",
        "numpy",
        "tqdm",
        "gguf>=0.10",          # GGUF files: llama.cpp's own reader (numpy only)
        "huggingface_hub>=0.25",   # Hub names: the cache, downloads, remote safetensors headers
        "tokenizers>=0.15",    # the `offload` command's tokenizers (folders and GGUF files)
        "jinja2>=3.1",         # chat templates
    ],
    extras_require={
        "test": ["pytest>=7", "transformers>=5.0", "accelerate>=0.30", "tokenizers>=0.15", "jinja2>=3.1",
                 "compressed-tensors>=0.12", "fastapi>=0.110", "uvicorn>=0.29", "openai>=1.40"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],   # offload serve
        "chat": [],            # (now installed by default; kept so `pip install -e ".[chat]"` still works)
        "bench": ["transformers>=4.45", "accelerate>=0.30"],
    },
    entry_points={"console_scripts": ["offload=offload.cli:main", "offload-plan=placement.cli:main"]},
)
