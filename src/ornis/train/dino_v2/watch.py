"""The warnings of a DINOv2 run going wrong, read from its logged numbers on the main process, each given once:
targets still uniform after the teacher-temperature warm-up (the DINO term carries no signal), and the KoLeo term
climbing (the class tokens crowding together: the encoder collapsing)."""

from __future__ import annotations

import logging
import math

from ornis.train.dino_v2.multicrop import GLOBAL_VIEWS
from ornis.train.dino_v2.presets import SMALL_IMAGES_METHOD as SMALL

log = logging.getLogger("ornis.train")

# A rise of the per-view KoLeo term this far above its lowest logged value warns of a collapse: nearest neighbours
# e^0.5 = 1.6x closer. On the digits (README) the collapse at the default lr raised it by 0.72; the healthy runs'
# term wobbled by at most 0.03
KOLEO_RISE = 0.5


class CollapseWatch:
    """Fed each logged entry (``__call__``); ``after`` is the first step the uniform-target warning may fire."""

    def __init__(
        self, out_dim: int, student_temp: float, teacher_temp: float, centering: str, mild_views: bool = False
    ) -> None:
        self.ln_k = math.log(out_dim)
        self.student_temp, self.teacher_temp, self.centering = student_temp, teacher_temp, centering
        self.mild_views = mild_views  # the run already has the small-image views: do not suggest them
        self.after = 0
        self.uniform_warned = self.crowding_warned = False
        self.koleo_low = math.inf

    def __call__(self, entry: dict[str, float], step: int) -> None:
        """Check one logged step's numbers (``step`` is 0-based)."""
        self._uniform_targets(entry, step)
        self._crowding(entry, step)

    def _uniform_targets(self, entry: dict[str, float], step: int) -> None:
        """The DINO loss still within 1 % of ln K (uniform targets: no signal) past ``after`` steps."""
        if self.uniform_warned or step + 1 < self.after or "dino" not in entry:
            return
        if abs(entry["dino"] - self.ln_k) <= 0.01 * self.ln_k:
            self.uniform_warned = True
            log.warning(
                "step %d: the DINO loss %.4f is still within 1%% of ln K = %.4f (target entropy %.3f): the targets "
                "are near uniform and the DINO term carries no signal; %s; %s",
                step + 1,
                entry["dino"],
                self.ln_k,
                entry.get("target_entropy", float("nan")),
                self._bootstrap_gain(entry),
                self._advice(),
            )

    def _crowding(self, entry: dict[str, float], step: int) -> None:
        """The KoLeo term risen well above its lowest logged value: the class tokens' nearest neighbours closing in,
        which is how the encoder collapsed at the default lr in a long small-batch run (README)."""
        # logged: the sum over the global views; per view: -mean log(nearest-neighbour distance)
        koleo = entry.get("koleo", math.nan) / GLOBAL_VIEWS
        if not math.isfinite(koleo):
            return
        if not self.crowding_warned and koleo > self.koleo_low + KOLEO_RISE:
            self.crowding_warned = True
            log.warning(
                "step %d: the KoLeo term per view rose from %.3f to %.3f: the class tokens' nearest neighbours are "
                "%.1fx closer than they were, the sign of an encoder collapsing; a lower --lr usually prevents it "
                "(watch --eval-knn)",
                step + 1,
                self.koleo_low,
                koleo,
                math.exp(koleo - self.koleo_low),
            )
        self.koleo_low = min(self.koleo_low, koleo)

    def _bootstrap_gain(self, entry: dict[str, float]) -> str:
        """Why the targets stay uniform: agreement x sharpening must exceed 1 (``view_correlation``)."""
        corr = entry.get("view_correlation", float("nan"))
        ratio = self.student_temp / entry.get("teacher_temp", self.teacher_temp)
        verdict = " below the 1 it needs, so the head learns to score every image alike" if corr * ratio < 1 else ""
        return (
            f"the teacher's two views of an image agree by {corr:.2f} (view_correlation) and self-distillation "
            f"multiplies that by student / teacher temperature = {ratio:.2f}: {corr * ratio:.2f}{verdict}"
        )

    def _advice(self) -> str:
        """What to change, given what this run already uses."""
        tips = [] if self.centering == "softmax" else ["softmax centring (--centering softmax)"]
        if not self.mild_views:
            tips.append(
                "views that agree with a faster, sharper teacher, for small or plain images (--small-images: crops "
                f"only, milder, teacher momentum {SMALL['momentum_teacher']:g} and temperature "
                f"{SMALL['teacher_temp']:g})"
            )
        tips += ["a lower teacher temperature (--warmup-teacher-temp, --teacher-temp)", "more steps"]
        return "try " + ", ".join(tips[:-1]) + " or " + tips[-1]
