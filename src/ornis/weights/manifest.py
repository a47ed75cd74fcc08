"""The published weights ornis knows: name, architecture, files, sizes and checksums.

Facts from the reference's model manifest (Birder 0.8.4). A file's URL is ``<base>/<name>.<format>``; the base
can be replaced by a mirror (see ``ornis.weights.cache``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from ornis.assets import SHIPPED_MODEL, ShippedModel
from ornis.errors import UnknownModelError

HF_BASE = "https://huggingface.co/birder-project/{name}/resolve/main"
FILE_FORMATS = ("pt", "safetensors")  # the formats weights are published in
DEFAULT_FILE_FORMAT = "pt"


@dataclass(frozen=True)
class WeightsFile:
    """One published file of some weights: its format, size and checksum."""

    format: str  # "pt" or "safetensors"
    size_mb: float
    sha256: str


@dataclass(frozen=True)
class PretrainedWeights:
    """Published weights: the architecture they are for, what they were trained for, and their files (``extra``
    holds ``local_path`` for weights that ship inside the package)."""

    name: str
    network: str  # registry architecture name
    tag: str
    resolution: tuple[int, int]
    task: str
    description: str
    files: tuple[WeightsFile, ...]
    num_classes: int
    base_url: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def formats(self) -> tuple[str, ...]:
        """The formats a file is published in."""
        return tuple(f.format for f in self.files)

    def file(self, file_format: str = DEFAULT_FILE_FORMAT) -> WeightsFile:
        """The published file in ``file_format``; ValueError naming the available formats when there is none."""
        for f in self.files:
            if f.format == file_format:
                return f
        raise ValueError(f"{self.name}: no {file_format!r} file is published; available: {', '.join(self.formats)}")

    def file_name(self, file_format: str = DEFAULT_FILE_FORMAT) -> str:
        """``<name>.<format>``, the file's name in the cache and on the server."""
        self.file(file_format)
        return f"{self.name}.{file_format}"

    def url(self, file_format: str = DEFAULT_FILE_FORMAT, base_url: str | None = None) -> str:
        """The file's URL: under ``base_url`` (a mirror) when given, else the entry's own base or Hugging Face."""
        base = base_url.rstrip("/") if base_url else (self.base_url or HF_BASE.format(name=self.name))
        return f"{base}/{self.file_name(file_format)}"


def _w(
    name: str, network: str, resolution: int, classes: int, description: str, *files: WeightsFile
) -> PretrainedWeights:
    tag = name[len(network) + 1 :]
    return PretrainedWeights(
        name=name,
        network=network,
        tag=tag,
        resolution=(resolution, resolution),
        task="image_classification",
        description=description,
        files=files,
        num_classes=classes,
    )


_WEIGHTS = [
    _w(
        "hieradet_d_small_dino-v2",
        "hieradet_d_small",
        224,
        0,
        "HieraDet (dynamic window size) small image encoder pre-trained with DINOv2 on ~21M images; a general-purpose "
        "feature extractor and detection backbone, not fine-tuned for classification",
        WeightsFile("pt", 129.6, "eb41b8a35445e7f350797094d5e365306b29351e64edd4a316420c23d1e17073"),
    ),
    _w(
        "hieradet_small_sam2_1",
        "hieradet_small",
        1024,
        0,
        "HieraDet small: the SAM 2.1 Hiera-S image-encoder trunk, converted; a general-purpose feature extractor",
        WeightsFile("pt", 129.6, "2ede3a78389ca74ed37d82dbc1c3410549f1fdafb5a7a94ac02968aa6d3dec80"),
    ),
    _w(
        "hiera_abswin_base_mim",
        "hiera_abswin_base",
        224,
        0,
        "Hiera base with absolute-window position embedding, pre-trained with masked image modelling on ~12M images",
        WeightsFile("pt", 192.7, "7133b4f857cca69d320173808d5c9921c1f05c129a76d58310a22bfafcd6deb1"),
        WeightsFile("safetensors", 192.6, "48adf5f778081ea2e5aa98e10149d3bf8f1d4ad15e7998cb5611cd450557dfc1"),
    ),
    _w(
        "vit_reg4_l14_nps_ls_dino-v2-lvd142m",
        "vit_reg4_l14_nps_ls",
        518,
        0,
        "ViT-L/14 with 4 registers from Meta's DINOv2 (LVD-142M), converted; a general-purpose feature extractor",
        WeightsFile("pt", 1161.2, "441721029ca0ef85582bc8822ec91d780ee442eb3d06b04fb5e4662c9317b52d"),
    ),
    _w(
        "flexivit_reg1_s16_rms_ls_dino-v2-il-all",
        "flexivit_reg1_s16_rms_ls",
        240,
        550,
        "FlexiViT reg1 S/16 (RMSNorm, layer scale) pre-trained with DINOv2 on il-all, then fine-tuned on its 550 "
        "bird species",
        WeightsFile("pt", 83.6, "8285f4fe56401f169491cb2399d2a7c82f3a0cfbe8a5a8d3c27163024a274800"),
    ),
]

MANIFEST: dict[str, PretrainedWeights] = {w.name: w for w in _WEIGHTS}


def register_weights(weights: PretrainedWeights) -> None:
    """Add an entry (e.g. a model that ships inside the package, or a user's own mirror list)."""
    if weights.name in MANIFEST:
        raise ValueError(f"weights {weights.name!r} are registered twice")
    MANIFEST[weights.name] = weights


def list_pretrained_models(pattern: str | None = None) -> list[str]:
    """Names of the published weights, sorted; ``pattern`` is a shell-style filter."""
    names = sorted(MANIFEST)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_weights(name: str) -> PretrainedWeights:
    """The manifest entry ``name``; UnknownModelError with the closest names when there is none."""
    try:
        return MANIFEST[name]
    except KeyError:
        raise UnknownModelError(name, MANIFEST, what="pretrained model") from None


def find_by_sha256(digest: str) -> PretrainedWeights | None:
    """The weights one of whose files has sha256 ``digest``, if any."""
    for w in MANIFEST.values():
        if any(f.sha256 == digest for f in w.files):
            return w
    return None


def shipped_weights(model: ShippedModel) -> PretrainedWeights:
    """The manifest entry of a model file that ships inside the package (found there, never downloaded)."""
    return PretrainedWeights(
        name=model.name,
        network=model.network,
        tag=model.tag,
        resolution=model.resolution,
        task=model.task,
        description=model.description,
        files=(WeightsFile(model.format, model.size_mb, model.sha256),),
        num_classes=model.num_classes,
        extra={"local_path": str(model.path)},
    )


register_weights(shipped_weights(SHIPPED_MODEL))
