"""Where every recipe's encoder comes from: a checkpoint (a published name or a file) to continue from, or an
architecture to train from scratch."""

from __future__ import annotations

import os
from typing import Any, Literal, NamedTuple

from ornis.loading import load_pretrained_model
from ornis.models.base import Encoder
from ornis.models.capabilities import SinCosPositions, require
from ornis.models.registry import build_model
from ornis.weights.checkpoint import DEFAULT_RGB_STATS

Positions = Literal["random", "sincos"]
POSITIONS = ("random", "sincos")


class StartedEncoder(NamedTuple):
    """The encoder a recipe trains, its normalisation statistics and the classes of its head."""

    encoder: Encoder
    rgb_stats: dict[str, Any]
    class_to_idx: dict[str, int]


def start_encoder(
    weights: str | os.PathLike | None,
    arch: str | None,
    size: int | None = None,
    model_config: dict[str, Any] | None = None,
    num_classes: int = 0,
    class_to_idx: dict[str, int] | None = None,
    positions: Positions = "random",
) -> StartedEncoder:
    """Load ``weights`` or build ``arch`` (exactly one of them) with a head of ``num_classes`` outputs.

    From a checkpoint, the head is kept when it already has those classes (``class_to_idx``, when given, must match
    the file's too), else replaced by a new one (``Encoder.create_classifier``: random, not zero; none for 0
    classes), and the model is re-based on ``size`` when given. From scratch, ``size`` and ``model_config`` (field
    overrides) shape the architecture, and ``positions="sincos"`` starts the position embeddings as a 2-D
    sine-cosine table (``SinCosPositions``; ``"random"``: the architecture's own init, std 0.02). Call
    ``torch.manual_seed`` first for the same start on every rank and run.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, found {positions!r}")
    if (weights is None) == (arch is None):
        raise ValueError("give exactly one of weights (start from a checkpoint) or arch (train from scratch)")
    if weights is None:
        try:
            net = build_model(str(arch), num_classes=num_classes, size=size, config=model_config)
        except TypeError as e:  # a field of the wrong kind, e.g. {"num_layers": "x"}
            raise ValueError(f"model_config {model_config}: a value of the wrong type for {arch} ({e})") from None
        if positions == "sincos":
            require(net, SinCosPositions, "sine-cosine position embeddings (positions='sincos')")
            net.init_sincos_positions()
        classes = class_to_idx if class_to_idx is not None else {str(i): i for i in range(num_classes)}
        return StartedEncoder(net, dict(DEFAULT_RGB_STATS), dict(classes))
    net, info = load_pretrained_model(weights)
    classes = info.class_to_idx
    if net.num_classes != num_classes or (class_to_idx is not None and info.class_to_idx != class_to_idx):
        net.reset_classifier(num_classes)
        classes = class_to_idx if class_to_idx is not None else {str(i): i for i in range(num_classes)}
    if size is not None and net.size != (size, size):
        net.adjust_size((size, size))
    return StartedEncoder(net, dict(info.rgb_stats or DEFAULT_RGB_STATS), dict(classes))
