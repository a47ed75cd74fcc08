"""The published checkpoint format, read and written.

A ``.pt`` file is a ``torch.save`` dict: ``state`` (state dict), ``task``, ``signature`` (input/output shapes),
``class_to_idx``, ``rgb_stats`` (``mean``, ``std``), ``birder_version`` and optionally ``config`` (architecture
overrides). ornis adds ``network`` (the architecture name) to files it writes; readers that do not know the key
ignore it. A ``.safetensors`` file holds the state's tensors and the same fields as JSON strings in its metadata.

Nothing here ever unpickles arbitrary objects: ``.pt`` files load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ornis._version import __version__
from ornis.errors import CheckpointFormatError, StateDictMismatchError, first_line
from ornis.models import registry
from ornis.utils.fs import atomic_path

FORMAT_VERSION = "0.8.4"  # the reference version whose file layout we write; stored as "birder_version"
REQUIRED_KEYS = ("state", "task", "signature", "class_to_idx", "rgb_stats")
# The reference's "birder" statistics, used when a checkpoint records none
DEFAULT_RGB_STATS = {"mean": (0.5191, 0.5306, 0.4877), "std": (0.2316, 0.2304, 0.2588)}
SAFETENSORS_SUFFIXES = (".safetensors", ".st")


@dataclass
class Checkpoint:
    """A checkpoint in the published format, in memory: the tensors and what the file says about them."""

    state: dict[str, torch.Tensor]
    signature: dict[str, Any]
    class_to_idx: dict[str, int]
    rgb_stats: dict[str, Any]
    task: str = "image_classification"
    config: dict[str, Any] | None = None
    network: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """The (H, W) input size the signature records."""
        return get_size_from_signature(self.signature)

    @property
    def num_classes(self) -> int:
        """Classifier outputs (0: an encoder without a head)."""
        if "num_labels" in self.signature:
            return int(self.signature["num_labels"])
        return int(self.signature["outputs"][0]["data_shape"][1])


def get_size_from_signature(signature: dict[str, Any]) -> tuple[int, int]:
    """The (H, W) input size a signature records."""
    shape = signature["inputs"][0]["data_shape"]
    return (int(shape[2]), int(shape[3]))


def make_signature(size: tuple[int, int], num_outputs: int, channels: int = 3) -> dict[str, Any]:
    """The reference's signature of a model: input (batch, channels, H, W) and output (batch, outputs), batch 0."""
    return {
        "inputs": [{"data_shape": [0, channels, int(size[0]), int(size[1])]}],
        "outputs": [{"data_shape": [0, int(num_outputs)]}],
    }


def require_regular_file(path: Path) -> None:
    """``CheckpointFormatError`` naming ``path`` unless it is a regular file: missing, a folder, or a special file
    (a FIFO or a device, which a read would block on or never finish)."""
    if path.is_file():
        return
    if not path.exists():
        raise CheckpointFormatError(path, "no such file")
    what = "a folder" if path.is_dir() else "not a regular file (a pipe, socket or device)"
    raise CheckpointFormatError(path, f"{what}; expected a checkpoint file")


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header length, then a JSON object
        return "safetensors"
    if head[:1] == b"\x80":  # a protocol-2+ pickle: torch's legacy (pre-1.6) format
        return "pickle"
    return "unknown"


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint in the published format, safely. Raises CheckpointFormatError naming the file."""
    path = Path(path)
    require_regular_file(path)
    if path.stat().st_size == 0:
        raise CheckpointFormatError(path, "the file is empty (0 bytes); expected a .pt or .safetensors checkpoint")
    kind = _sniff(path)
    if kind == "safetensors" or (kind == "unknown" and path.suffix in SAFETENSORS_SUFFIXES):
        return _read_safetensors(path, map_location)
    if kind == "unknown":
        raise CheckpointFormatError(
            path, "not a checkpoint: expected a torch.save zip archive (.pt) or a safetensors file"
        )
    if kind == "zip" and not zipfile.is_zipfile(path):
        raise CheckpointFormatError(path, "the zip archive is truncated or corrupt (a partial download?)")
    # mmap: a 1 GB checkpoint is paged in as it is used instead of read whole first
    obj = load_torch_file(path, map_location, mmap=kind == "zip")
    if not isinstance(obj, dict):
        raise CheckpointFormatError(
            path, f"expected a dict with keys {', '.join(REQUIRED_KEYS)}, found a {type(obj).__name__}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise CheckpointFormatError(
            path,
            f"expected keys {', '.join(REQUIRED_KEYS)}; missing {', '.join(missing)} "
            f"(found {', '.join(map(str, obj))})",
        )
    known = set(REQUIRED_KEYS) | {"config", "network"}
    return Checkpoint(
        state=obj["state"],
        signature=obj["signature"],
        class_to_idx=obj["class_to_idx"],
        rgb_stats=obj["rgb_stats"],
        task=str(obj["task"]),
        config=obj.get("config") or None,
        network=obj.get("network"),
        extra={k: v for k, v in obj.items() if k not in known},
    )


def load_torch_file(path: Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``, with every way a file can fail to be one turned into a
    ``CheckpointFormatError`` naming it: an object other than tensors and plain data is refused, and junk (a text
    file, a truncated or foreign archive) is reported as such, whatever the unpickler raised on the way."""
    require_regular_file(path)
    if _sniff(path) not in ("zip", "pickle"):
        raise CheckpointFormatError(
            path, "not a torch.save file (neither a zip archive nor a pickle); truncated, or another kind of file?"
        )
    try:
        with warnings.catch_warnings():
            # Junk behind a pickle header often "detects" another protocol; the error below says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(e)
        if "global" in str(e).lower() or "class" in reason.lower():  # a callable or class it will not import
            raise CheckpointFormatError(
                path, f"refused to unpickle: the file holds objects other than tensors and plain data ({reason})"
            ) from None
        raise CheckpointFormatError(path, f"cannot be read as a checkpoint, truncated or corrupt ({reason})") from None
    except MemoryError:
        raise
    except Exception as e:  # junk meets the unpickler anywhere: KeyError, IndexError, UnicodeDecodeError...
        raise CheckpointFormatError(
            path, f"cannot be read as a checkpoint, truncated or corrupt ({type(e).__name__}: {first_line(e)})"
        ) from None


def _unpickler_reason(e: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler objected to, without its paragraphs of advice (which suggest
    ``weights_only=False``, the one thing ornis never does)."""
    advice = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")
    for line in str(e).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not line.startswith(advice):
            return line.split(". Please")[0].strip()[:300]
    return first_line(e)


def _read_safetensors(path: Path, map_location: str | torch.device) -> Checkpoint:
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointFormatError(
            path, f"cannot be read as safetensors, truncated or corrupt ({first_line(e)})"
        ) from None
    missing = [k for k in ("signature", "class_to_idx", "rgb_stats") if k not in meta]
    if missing:
        raise CheckpointFormatError(
            path, f"safetensors metadata lacks {', '.join(missing)} (found {', '.join(meta) or 'none'})"
        )
    try:
        return Checkpoint(
            state=state,
            signature=json.loads(meta["signature"]),
            class_to_idx=json.loads(meta["class_to_idx"]),
            rgb_stats=json.loads(meta["rgb_stats"]),
            task=meta.get("task", "image_classification"),
            config=_json_config(meta["config"]) if meta.get("config") else None,
            network=meta.get("network"),
            extra={k: v for k, v in meta.items() if k in ("birder_version", "ornis_version")},
        )
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(path, f"safetensors metadata is not valid JSON ({e})") from None


def _json_config(text: str) -> dict[str, Any]:
    """A config stored as JSON, with its lists back as tuples: JSON has none, and config dataclasses hold sequences
    as tuples (as a ``.pt`` file keeps them), so both formats read back the same config."""

    def tuples(value: Any) -> Any:
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value

    return {k: tuples(v) for k, v in json.loads(text).items()}


def check_destination(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path``; ``IsADirectoryError`` naming it when it is a folder (the file to write goes there,
    not into it), raised before any work, not by the final rename."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            errno.EISDIR, "a folder; expected the name of the .pt or .safetensors file to write", str(path)
        )
    return path


def write_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> Path:
    """Write ``ckpt`` in the published format (by suffix: ``.safetensors`` or ``.pt``), atomically, with the mode
    the umask allows (0644 under umask 022)."""
    path = check_destination(path)
    with atomic_path(path) as tmp:
        if path.suffix in SAFETENSORS_SUFFIXES:
            meta = {
                "birder_version": FORMAT_VERSION,
                "ornis_version": __version__,
                "task": ckpt.task,
                "class_to_idx": json.dumps(ckpt.class_to_idx),
                "signature": json.dumps(ckpt.signature),
                "rgb_stats": json.dumps(ckpt.rgb_stats),
            }
            if ckpt.config:
                meta["config"] = json.dumps(ckpt.config)
            if ckpt.network:
                meta["network"] = ckpt.network
            save_file({k: v.detach().contiguous() for k, v in ckpt.state.items()}, tmp, metadata=meta)
        else:
            obj: dict[str, Any] = {
                "state": ckpt.state,
                "birder_version": FORMAT_VERSION,
                "task": ckpt.task,
                "signature": ckpt.signature,
                "class_to_idx": ckpt.class_to_idx,
                "rgb_stats": ckpt.rgb_stats,
            }
            if ckpt.config:
                obj["config"] = ckpt.config
            if ckpt.network:
                obj["network"] = ckpt.network
            torch.save(obj, tmp)
    return path


def config_overrides(net: nn.Module) -> dict[str, Any] | None:
    """The fields of ``net.config`` that differ from its registered variant's (what a checkpoint must record for the
    file to rebuild the same architecture); None when there are none or ``net`` is not a registered variant."""
    return config_changes(getattr(net, "name", None), getattr(net, "config", None))


def config_changes(network: str | None, config: Any) -> dict[str, Any] | None:
    """The fields of ``config`` that differ from registered architecture ``network``'s config; None when there are
    none, or ``network`` is not registered, or ``config`` is not a config dataclass."""
    if network not in registry.list_models() or not dataclasses.is_dataclass(config):
        return None
    registered = registry.get_model_spec(network).config
    changed = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(registered, f.name)
    }
    return changed or None


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP-sharded one (a collective: every rank must call it); others as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def checkpoint_from_model(
    net: nn.Module,
    *,
    class_to_idx: dict[str, int] | None = None,
    rgb_stats: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> Checkpoint:
    """An ornis encoder as a published-format checkpoint: its state (copied to the CPU, gathered whole if sharded),
    signature, classes (default ``"0".."n-1"``), rgb stats (default ``DEFAULT_RGB_STATS``), architecture name, and
    its config overrides (``config_overrides``, updated with ``config``) so that the file rebuilds the same model."""
    num_classes = int(getattr(net, "num_classes", 0))
    overrides = {**(config_overrides(net) or {}), **(config or {})} or None
    return Checkpoint(
        state={k: _whole(v).detach().cpu().clone() for k, v in net.state_dict().items()},
        signature=make_signature(net.size, num_classes),
        class_to_idx=dict(class_to_idx) if class_to_idx is not None else {str(i): i for i in range(num_classes)},
        rgb_stats={k: list(v) for k, v in (rgb_stats or DEFAULT_RGB_STATS).items()},
        task=getattr(net, "task", "image_classification"),
        config=overrides,
        network=getattr(net, "name", None),
    )


def save_model(
    net: nn.Module,
    path: str | os.PathLike,
    *,
    class_to_idx: dict[str, int] | None = None,
    rgb_stats: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """Save an ornis encoder in the published format (by suffix: ``.pt`` or ``.safetensors``), ready for
    ``ornis.load_pretrained_model(path)``: the file records the model's config overrides, so whatever is saved
    loads back as the same architecture."""
    check_destination(path)
    ckpt = checkpoint_from_model(net, class_to_idx=class_to_idx, rgb_stats=rgb_stats, config=config)
    return write_checkpoint(ckpt, path)


class LoadReport(NamedTuple):
    """The keys a non-strict load left out: the model's tensors the state lacked, and the state's the model has not."""

    missing: list[str]
    unexpected: list[str]


def load_state(
    net: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    strict: bool = True,
    path: str | os.PathLike | None = None,
    assign: bool = False,
) -> LoadReport:
    """Load ``state`` into ``net``; a missing, unexpected or mis-shaped key raises StateDictMismatchError listing
    them all. With ``strict=False`` the tensors that fit are loaded and the keys left out are returned.
    ``assign=True`` adopts the tensors instead of copying them (for a model built on the meta device); they are
    cast to the model's dtypes first, as a copy would."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        (k, tuple(own[k].shape), tuple(v.shape)) for k, v in state.items() if k in own and own[k].shape != v.shape
    ]
    if strict and (missing or unexpected or mismatched):
        raise StateDictMismatchError(path, getattr(net, "name", type(net).__name__), missing, unexpected, mismatched)
    if mismatched:
        raise StateDictMismatchError(path, getattr(net, "name", type(net).__name__), [], [], mismatched)
    if assign:
        state = {
            k: v.to(own[k].dtype) if k in own and v.is_floating_point() and v.dtype != own[k].dtype else v
            for k, v in state.items()
        }
    net.load_state_dict(state, strict=False, assign=assign)
    return LoadReport(missing, unexpected)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
