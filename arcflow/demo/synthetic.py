"""Synthetic captioned scenes: a renderer, its captions, and a detector that reads scenes back.

A distilled student can only be judged against a teacher that has learnt something, and a
teacher can only be trained offline on data made here. Scenes are simple enough (one kind
of flat-coloured shape on a plain background) that a few lines of image analysis recover
their colour, shape, count and position, which turns "does the sample follow the prompt?"
into a number. Everything is a pure function of ``(seed, index)``.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Every word of a caption is a whole word of the tiny FLUX tokenizers (arcflow.models.flux.tiny),
# except "bottom" and "background", which they spell in sub-words.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (240, 240, 240), "black": (20, 20, 20), "grey": (120, 120, 120)}
SHAPES = ("circle", "square", "triangle", "ring")
SIZES = {"small": 0.20, "large": 0.30}  # radius of the shape's circumcircle, as a fraction of the side
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) centre, fractions of the side
    "on the left": (0.28, 0.5),
    "on the right": (0.72, 0.5),
    "at the top": (0.5, 0.28),
    "at the bottom": (0.5, 0.72),
}
COUNTS = {1: "a", 2: "two", 3: "three"}
_MULTI_RADIUS = 0.13  # with the lattice's 0.3 spacing and 0.01 jitter, shapes stay 1 px apart at 64 px
_JITTER = 0.04
_RING_INNER = 0.55
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """What a caption says, plus where exactly the shapes are (centres in [0, 1]^2, radius)."""

    colour: str
    shape: str
    size: str
    count: int
    position: str | None
    background: str
    centres: tuple[tuple[float, float], ...]
    radius: float

    @property
    def caption(self) -> str:
        if self.count == 1:
            return f"a {self.size} {self.colour} {self.shape} {self.position} on a {self.background} background"
        return f"{COUNTS[self.count]} {self.size} {self.colour} {self.shape}s on a {self.background} background"


def make_scene(seed: int, index: int) -> Scene:
    """The ``index``-th scene of the set ``seed``: same arguments, same scene, on any machine."""
    rng = random.Random(seed * 1_000_003 + index)
    colour, shape, background = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
    count = rng.choice((1, 1, 1, 2, 3))
    if count == 1:
        size, position = rng.choice(list(SIZES)), rng.choice(list(POSITIONS))
        x, y = POSITIONS[position]
        centres = ((x + rng.uniform(-_JITTER, _JITTER), y + rng.uniform(-_JITTER, _JITTER)),)
        return Scene(colour, shape, size, 1, position, background, centres, SIZES[size])
    # Several small shapes on a 3x3 lattice of well-separated cells, each jittered inside its cell.
    cells = rng.sample([(cx, cy) for cx in (0.2, 0.5, 0.8) for cy in (0.2, 0.5, 0.8)], count)
    centres = tuple((cx + rng.uniform(-_JITTER / 4, _JITTER / 4), cy + rng.uniform(-_JITTER / 4, _JITTER / 4))
                    for cx, cy in cells)
    return Scene(colour, shape, "small", count, None, background, centres, _MULTI_RADIUS)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: tuple[int, int, int] | int, background: tuple[int, int, int] | int) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        half = 0.8 * r
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + 0.866 * r, cy + 0.5 * r), (cx - 0.866 * r, cy + 0.5 * r)], fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        inner = _RING_INNER * r
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=background)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size``, drawn 4x larger and box-filtered (anti-aliased)."""
    big = size * _SUPERSAMPLE
    background = BACKGROUNDS[scene.background]
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    for cx, cy in scene.centres:
        _draw_shape(draw, scene.shape, cx * big, cy * big, scene.radius * big, COLOURS[scene.colour], background)
    return image.resize((size, size), Image.Resampling.BOX)


@dataclass(frozen=True)
class Detection:
    """What :func:`detect` reads from an image; ``None`` where it finds no object."""

    colour: str | None
    shape: str | None
    count: int
    position: str | None
    background: str


def _nearest(value: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.sum((value - np.asarray(palette[name], dtype=np.float64)) ** 2)))


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a boolean image, each as a boolean mask (a flood fill; images are tiny)."""
    seen = np.zeros_like(mask)
    height, width = mask.shape
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        region = np.zeros_like(mask)
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            region[y, x] = True
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        regions.append(region)
    return regions


def _outline(shape: str, cx: float, cy: float, r: float, side: int) -> np.ndarray:
    """Boolean mask of ``shape`` drawn as :func:`render` draws it (centre in pixels, circumradius ``r``)."""
    big = side * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, cx * _SUPERSAMPLE, cy * _SUPERSAMPLE, r * _SUPERSAMPLE, 255, 0)
    return np.asarray(canvas.resize((side, side), Image.Resampling.BOX)) >= 128


# Area of each shape over its squared circumradius; every shape's centroid is its centre.
_AREA_OVER_R2 = {"circle": math.pi, "square": 1.6 ** 2, "triangle": 3 * math.sqrt(3) / 4,
                 "ring": math.pi * (1 - _RING_INNER ** 2)}


def _classify_shape(region: np.ndarray) -> str:
    """The shape whose outline, placed at the region's centroid with the region's area, overlaps it most (IoU).

    Matching whole outlines keeps working on the soft edges of decoded samples, where a
    softened triangle still overlaps a triangle best (a bounding-box fill ratio called
    one in six of them circles once renders were blurred by 1.5 px).
    """
    rows, cols = np.nonzero(region)
    cy, cx, area = rows.mean() + 0.5, cols.mean() + 0.5, float(region.sum())

    def overlap(shape: str) -> float:
        outline = _outline(shape, cx, cy, math.sqrt(area / _AREA_OVER_R2[shape]), region.shape[0])
        return float((outline & region).sum() / (outline | region).sum())

    return max(SHAPES, key=overlap)


def detect(image: Image.Image | np.ndarray, threshold: float = 80.0) -> Detection:
    """Read background, colour, shape, count and position of the shapes in an RGB image.

    Background = palette colour nearest the median border pixel; objects = 4-connected regions
    farther than ``threshold`` (RGB distance) from it, ignoring specks under a quarter of the
    largest region. Colour is the palette colour nearest the largest region's median pixel.
    """
    pixels = np.asarray(image, dtype=np.float64)[..., :3]
    side = pixels.shape[0]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = _nearest(np.median(border, axis=0), BACKGROUNDS)
    distance = np.linalg.norm(pixels - np.asarray(BACKGROUNDS[background], dtype=np.float64), axis=-1)
    regions = _components(distance > threshold)
    if not regions:
        return Detection(None, None, 0, None, background)
    areas = [int(region.sum()) for region in regions]
    largest = regions[int(np.argmax(areas))]
    count = sum(area >= max(0.25 * max(areas), 0.002 * side * side) for area in areas)
    colour = _nearest(np.median(pixels[largest], axis=0), COLOURS)
    position = None
    if count == 1:
        rows, cols = np.nonzero(largest)
        cx, cy = (cols.mean() + 0.5) / side, (rows.mean() + 0.5) / side
        position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return Detection(colour, _classify_shape(largest), count, position, background)


_SINGLE = re.compile(rf"^a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
                     rf"({'|'.join(POSITIONS)}) on a ({'|'.join(BACKGROUNDS)}) background$")
_GROUP = re.compile(rf"^({'|'.join(COUNTS[n] for n in COUNTS if n > 1)}) (small) ({'|'.join(COLOURS)}) "
                    rf"({'|'.join(SHAPES)})s on a ({'|'.join(BACKGROUNDS)}) background$")


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes (without the exact shape positions: ``centres`` is empty)."""
    single, group = _SINGLE.match(caption), _GROUP.match(caption)
    if single:
        size, colour, shape, position, background = single.groups()
        return Scene(colour, shape, size, 1, position, background, (), SIZES[size])
    if group:
        count_word, size, colour, shape, background = group.groups()
        count = next(n for n, word in COUNTS.items() if word == count_word)
        return Scene(colour, shape, size, count, None, background, (), _MULTI_RADIUS)
    raise ValueError(f"not a synthetic scene caption: {caption!r}")


def prompt_follows(scene: Scene, found: Detection) -> bool:
    """The headline criterion: the detected colour and shape are those of the caption."""
    return found.colour == scene.colour and found.shape == scene.shape


def attribute_matches(scene: Scene, found: Detection) -> dict[str, bool]:
    """Per attribute agreement, for reporting beside :func:`prompt_follows`."""
    return {
        "colour": found.colour == scene.colour,
        "shape": found.shape == scene.shape,
        "count": found.count == scene.count,
        "position": scene.position is None or found.position == scene.position,
        "background": found.background == scene.background,
    }


def accuracies(scenes: list[Scene], images: list[np.ndarray]) -> dict[str, float]:
    """Fractions of ``images`` (uint8 RGB) that follow their scene: ``prompt`` (colour and shape) and each attribute."""
    found = [detect(image) for image in images]
    matches = [attribute_matches(scene, detection) for scene, detection in zip(scenes, found)]
    result = {"prompt": float(np.mean([prompt_follows(s, d) for s, d in zip(scenes, found)]))}
    for attribute in matches[0]:
        result[attribute] = float(np.mean([match[attribute] for match in matches]))
    return result


def scene_batch(seed: int, start: int, length: int, size: int = 64) -> tuple[np.ndarray, list[Scene]]:
    """Rendered images (N, size, size, 3) uint8 and their scenes for indices ``start..start+length-1``."""
    scenes = [make_scene(seed, index) for index in range(start, start + length)]
    return np.stack([np.asarray(render(scene, size)) for scene in scenes]), scenes
