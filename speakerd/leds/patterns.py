"""What each session state looks like: the pattern tables and the pixel frames they draw."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

FPS = 30  # frames per second while a pattern changes from frame to frame (breathe)

Color = tuple[float, float, float]  # red, green, blue, each 0-1
Pixel = tuple[int, int, int]  # red, green, blue, each 0-255


@dataclass(frozen=True, slots=True)
class Pattern:
    kind: str  # off | solid | blink | pulse (= breathe) | spin (pixel rings only)
    color: Color = (0.0, 0.0, 0.0)
    on_seconds: float = 0.5  # blink: time lit; pulse/breathe: fade-in time; spin: one turn
    off_seconds: float = 0.5  # blink: time dark; pulse/breathe: fade-out time
    width: int = 0  # spin: pixels lit (head and a fading tail); 0: a quarter of the ring
    flash_seconds: float = 0.0  # rings: every pixel lit at the colour this long first


BLUE, CYAN, RED = (0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 0.0, 0.0)
# What a person across the room should read off the LED; [leds.patterns] overrides.
DEFAULT_PATTERNS: dict[str, Pattern] = {
    "idle": Pattern("off"),
    "connecting": Pattern("blink", BLUE, 0.1, 0.1),
    "listening": Pattern("solid", BLUE),
    "thinking": Pattern("pulse", BLUE, 0.5, 0.5),
    "responding": Pattern("solid", CYAN),
    "audio_playing": Pattern("solid", CYAN),
    "muted": Pattern("solid", RED),
    "error": Pattern("blink", RED, 0.2, 0.2),
}
# A pixel ring, after the commercial speakers' conventions: dark at rest, a flash on
# the wake word, a spin while waiting, steady while listening, breathing while it speaks.
RING_PATTERNS: dict[str, Pattern] = {
    "idle": Pattern("off"),
    "connecting": Pattern("spin", BLUE, 1.0, flash_seconds=0.2),
    "listening": Pattern("solid", BLUE),
    "thinking": Pattern("spin", CYAN, 1.0),
    "responding": Pattern("breathe", CYAN, 1.0, 1.0),
    "audio_playing": Pattern("breathe", CYAN, 1.0, 1.0),
    "muted": Pattern("solid", RED),
    "error": Pattern("blink", RED, 0.2, 0.2),
}


def table(defaults: Mapping[str, Pattern], overrides: Mapping[str, Mapping[str, Any]]
          ) -> dict[str, Pattern]:
    """The defaults with [leds.patterns] applied (already validated by speakerd.config)."""
    out = dict(defaults)
    for state, spec in overrides.items():
        base = out[state]
        out[state] = replace(
            base, kind=spec.get("kind", base.kind),
            color=tuple(float(c) for c in spec.get("color", base.color)),  # type: ignore[arg-type]
            on_seconds=float(spec.get("on_seconds", base.on_seconds)),
            off_seconds=float(spec.get("off_seconds", base.off_seconds)),
            width=int(spec.get("width", base.width)),
            flash_seconds=float(spec.get("flash_seconds", base.flash_seconds)))
    return out


def spin_width(p: Pattern, count: int) -> int:
    return min(count, p.width or max(1, count // 4))


def spin_step_seconds(p: Pattern, count: int) -> float:
    """A spin moves one pixel (towards higher indices) every this many seconds."""
    return max(p.on_seconds / count, 1 / FPS)


def render(p: Pattern, count: int, t: float) -> tuple[Pixel, ...]:
    """The ring's pixels `t` seconds after the pattern started."""
    if t < p.flash_seconds:
        return (_scale(p.color, 1.0),) * count
    t -= p.flash_seconds
    if p.kind == "off" or not max(p.color):
        return ((0, 0, 0),) * count
    if p.kind == "solid":
        return (_scale(p.color, 1.0),) * count
    if p.kind == "blink":
        lit = t % (p.on_seconds + p.off_seconds) < p.on_seconds
        return (_scale(p.color, 1.0 if lit else 0.0),) * count
    if p.kind in ("breathe", "pulse"):
        return (_scale(p.color, breathe_level(p, t)),) * count
    if p.kind == "spin":
        head = int(t // spin_step_seconds(p, count)) % count
        width = spin_width(p, count)
        pixels = [(0, 0, 0)] * count
        for i in range(width):  # the head at full colour, the tail fading behind it
            pixels[(head - i) % count] = _scale(p.color, (width - i) / width)
        return tuple(pixels)
    raise ValueError(f"unknown pattern kind {p.kind!r}")


def breathe_level(p: Pattern, t: float) -> float:
    """0-1: a cosine fade in over on_seconds, then out over off_seconds, repeated."""
    x = t % (p.on_seconds + p.off_seconds)
    if x < p.on_seconds:
        return (1 - math.cos(math.pi * x / p.on_seconds)) / 2
    return (1 + math.cos(math.pi * (x - p.on_seconds) / p.off_seconds)) / 2


def next_change(p: Pattern, count: int, t: float) -> float | None:
    """Seconds from `t` until the pattern may draw a different frame; None: never.

    A static pattern is drawn once; blink and spin wake the animator only when they
    move; breathe changes continuously and is drawn at FPS.
    """
    if t < p.flash_seconds:
        return p.flash_seconds - t
    t -= p.flash_seconds
    if p.kind in ("off", "solid") or not max(p.color):
        return None
    if p.kind == "blink":
        x = t % (p.on_seconds + p.off_seconds)
        return (p.on_seconds - x) if x < p.on_seconds else (p.on_seconds + p.off_seconds - x)
    if p.kind == "spin":
        step = spin_step_seconds(p, count)
        return step - t % step
    return 1 / FPS


def _scale(color: Color, level: float) -> Pixel:
    r, g, b = (round(255 * c * level) for c in color)
    return (r, g, b)
