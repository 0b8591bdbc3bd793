"""Find a checkpoint (local directory or Hugging Face id), validate it, and load its weights."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from rankserve.errors import CheckpointError
from rankserve.model.config import RerankerConfig

if TYPE_CHECKING:  # torch is imported only to load weights: the API layers and settings do without it
    import torch

    from rankserve.model.llama import Reranker

log = logging.getLogger(__name__)

MODEL_ID = "nvidia/llama-nemotron-rerank-1b-v2"
# Names the same checkpoint has had; requests naming any of them are served.
MODEL_ALIASES = ("nvidia/llama-3.2-nv-rerankqa-1b-v2", "nvidia/llama-3_2-nv-rerankqa-1b-v2")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Present in some exports; not part of the reranker.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
IGNORED_KEYS = ("lm_head.weight",)
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*"]


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: RerankerConfig
    weight_files: tuple[Path, ...]
    tokenizer_file: Path

    @property
    def fingerprint(self) -> str:
        """Identifies these exact weights (for caches): hash of the config and the weight files' sizes/mtimes."""
        import hashlib

        h = hashlib.sha256(json.dumps(self.config.raw, sort_keys=True).encode())
        for f in self.weight_files:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def resolve(model: str, *, offline: bool | None = None) -> Path:
    """A local directory as is; otherwise a Hugging Face id, fetched into the Hugging Face cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{model} is a file; pass the checkpoint directory that holds config.json")
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise CheckpointError(
            f"Checkpoint directory {model} does not exist. Pass a local directory in the Hugging Face format "
            f"(config.json, *.safetensors, tokenizer.json) or a Hugging Face model id such as {MODEL_ID}."
        )
    return _download(model, offline=offline)


def _download(repo_id: str, *, offline: bool | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    local_only = bool(offline) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    log.info("fetching %s from the Hugging Face Hub (or its local cache)", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS, local_files_only=local_only))
    except LocalEntryNotFoundError:
        reason = (
            "it is not in the local Hugging Face cache and downloads are off (unset HF_HUB_OFFLINE to download)"
            if local_only
            else "the Hub could not be reached and the model is not in the local cache"
        )
    except GatedRepoError:
        reason = "it is gated: accept its licence on huggingface.co and set HF_TOKEN"
    except RepositoryNotFoundError:
        reason = "no such repository exists (or it is private and HF_TOKEN is not set)"
    except HfHubHTTPError as e:
        reason = f"the Hub answered {e}"
    except Exception as e:  # offline, DNS, proxy, disk: huggingface_hub raises many types here
        reason = f"{type(e).__name__}: {e}".strip()
    raise CheckpointError(
        f"Could not fetch the model {repo_id!r} from the Hugging Face Hub: {reason.rstrip('. ')}. "
        "This machine may be offline, or the Hub unreachable. Either download it elsewhere "
        f"(`hf download {repo_id} --local-dir DIR`) and pass that directory, or run where "
        "huggingface.co is reachable (set HF_TOKEN for gated models, HF_HOME to choose the cache). "
        "To try the server without the real weights, generate a test checkpoint with "
        "`python scripts/make_test_checkpoint.py --size tiny --output checkpoints/tiny` and pass that directory."
    )


def open_checkpoint(model: str, *, offline: bool | None = None) -> Checkpoint:
    """Resolve and validate everything except tensor contents (cheap: reads headers only)."""
    path = resolve(model, offline=offline)
    config = RerankerConfig.from_file(path / "config.json")
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{path} has no tokenizer.json (the Llama-3 tokenizer the model was trained with)")
    files = _weight_files(path)
    _validate_tensors(config, files)
    return Checkpoint(path=path, config=config, weight_files=files, tokenizer_file=tokenizer_file)


def _weight_files(path: Path) -> tuple[Path, ...]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is malformed ({e!r}); it needs a `weight_map` object") from None
        files = tuple(path / name for name in sorted(set(weight_map.values())))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names weight files that are missing: {', '.join(missing)}")
        return files
    if (path / SINGLE_FILE).is_file():
        return (path / SINGLE_FILE,)
    if (path / "pytorch_model.bin").is_file():
        raise CheckpointError(
            f"{path} holds only pytorch_model.bin; rankserve loads safetensors. Convert it once with "
            "transformers (`model.save_pretrained(DIR, safe_serialization=True)`) and pass DIR."
        )
    raise CheckpointError(f"{path} holds no {SINGLE_FILE} nor {INDEX_FILE}")


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.endswith(IGNORED_SUFFIXES)


def _validate_tensors(config: RerankerConfig, files: tuple[Path, ...]) -> None:
    expected = config.parameter_shapes()
    seen: set[str] = set()
    for f in files:
        try:
            with safe_open(f, framework="numpy") as st:  # headers only: no tensor is read
                for key in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if _ignored(key):
                        continue
                    if key not in expected:
                        raise CheckpointError(f"{f.name}: unexpected tensor `{key}` (is this the reranker?)")
                    if key in seen:
                        raise CheckpointError(f"tensor `{key}` is stored twice (again in {f.name})")
                    shape = tuple(st.get_slice(key).get_shape())
                    if shape != expected[key]:
                        raise CheckpointError(
                            f"{f.name}: tensor `{key}` has shape {list(shape)}, config.json implies "
                            f"{list(expected[key])}"
                        )
                    seen.add(key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from None
    missing = [k for k in expected if k not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"the checkpoint lacks tensor `{missing[0]}`{more}")


def load_model(ckpt: Checkpoint, *, device: str | torch.device = "cpu", dtype: torch.dtype) -> Reranker:
    """Build the model on `device` in `dtype` with no other full copy of the weights in memory.

    The module is created on the meta device (no allocation), then each tensor is read from the
    safetensors file (memory-mapped), converted and moved on its own, and assigned in place.
    """
    import torch

    from rankserve.model.llama import Reranker, rope_inv_freq

    with torch.device("meta"):
        model = Reranker(ckpt.config)
    params = dict(model.named_parameters())
    for f in ckpt.weight_files:
        with safe_open(f, framework="pt", device="cpu") as st:
            for key in st.keys():  # noqa: SIM118
                if _ignored(key):
                    continue
                tensor = st.get_tensor(key).to(device=device, dtype=dtype)
                _assign(model, key, torch.nn.Parameter(tensor, requires_grad=False))
                params.pop(key)
    if params:  # _validate_tensors rules this out; never serve a module with meta (unset) weights
        raise CheckpointError(f"the checkpoint lacks tensor `{sorted(params)[0]}`")
    cfg = ckpt.config
    # The RoPE buffer was created on the meta device with the module; compute it for real.
    model.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    return model.eval().requires_grad_(False)


def _assign(model: torch.nn.Module, key: str, value: torch.nn.Parameter) -> None:
    owner_name, _, attr = key.rpartition(".")
    setattr(model.get_submodule(owner_name), attr, value)
