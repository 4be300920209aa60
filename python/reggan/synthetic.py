"""The built-in dataset: procedurally rendered, aligned, paired faces.

Every identity is a vector of face parameters (head shape, skin tone, hair, eyes and their
spacing, brows, nose, mouth, lighting, background, clothes) drawn from its own random stream,
so identity k is the same whatever the number of identities generated. Each of the seven
expressions moves the parts that move on real faces (brows, eye opening, lower lids, cheeks,
mouth corners, mouth opening and teeth, upper lip, nose wrinkles, jaw drop), scaled by the
identity's own expressiveness. Faces are rendered with numpy, vectorized over identities, with
analytic anti-aliasing from signed distances.

Held-out identities also get out-of-distribution variants (pencil sketch, colour and lighting
shift, noise with JPEG artefacts, textured backgrounds from scikit-image's bundled images,
scale and rotation jitter), applied with the same parameters to every expression of a subject
so that pairs stay aligned.

The dataset is written in the folder-per-subject layout that `reggan.data` reads
(`<split>/<subject>/<expression>.png`), generated on first use and cached.
"""

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

from reggan.expressions import DEFAULT_EXPRESSIONS

GENERATOR_VERSION = 1
OOD_VARIANTS = ("sketch", "color_light", "noise_jpeg", "texture_bg", "scale_rotate")

# Expression parameters (0 = neutral). brow_raise/tilt/squeeze, mouth_curve/open, lip_raise and
# jaw_drop are in face units (the image spans [-1, 1]); eye_open and mouth_width are factors.
_EXPRESSION_PARAMS = {
    "neutral": {},
    "happy": dict(brow_raise=0.015, eye_open=0.78, lower_lid=0.45, cheek=1.0, fold=1.0,
                  mouth_curve=0.085, mouth_open=0.055, mouth_width=1.22, teeth=1.0),
    "sad": dict(brow_tilt=0.075, brow_squeeze=0.02, eye_open=0.72, mouth_curve=-0.07,
                mouth_width=0.92, lip_press=0.4, chin=1.0),
    "fearful": dict(brow_raise=0.06, brow_tilt=0.05, brow_squeeze=0.03, eye_open=1.45,
                    mouth_curve=-0.025, mouth_open=0.065, mouth_width=1.15, teeth=0.6,
                    forehead=0.6),
    "angry": dict(brow_raise=-0.05, brow_tilt=-0.085, brow_squeeze=0.045, eye_open=0.68,
                  mouth_curve=-0.02, mouth_width=0.84, lip_press=1.0, flare=0.6, fold=0.3),
    "surprised": dict(brow_raise=0.11, brow_arch=0.02, eye_open=1.6, mouth_open=0.17,
                      mouth_width=0.72, jaw_drop=0.05, forehead=1.0),
    "disgusted": dict(brow_raise=-0.03, brow_tilt=-0.035, brow_squeeze=0.02, eye_open=0.6,
                      lower_lid=0.35, mouth_curve=-0.045, mouth_open=0.015, lip_raise=0.05,
                      teeth=0.8, wrinkle=1.0, flare=1.0, fold=0.8, asym=1.0),
}
_NEUTRAL = dict(brow_raise=0.0, brow_tilt=0.0, brow_squeeze=0.0, brow_arch=0.0, eye_open=1.0,
                lower_lid=0.0, cheek=0.0, fold=0.0, mouth_curve=0.0, mouth_open=0.0,
                mouth_width=1.0, teeth=0.0, lip_press=0.0, lip_raise=0.0, jaw_drop=0.0,
                wrinkle=0.0, flare=0.0, forehead=0.0, chin=0.0, asym=0.0)

_SKIN = np.array([[255, 226, 204], [241, 196, 168], [224, 172, 128], [198, 140, 98],
                  [160, 104, 68], [118, 76, 50], [84, 54, 38]], np.float32) / 255
_HAIR = np.array([[22, 18, 16], [58, 38, 26], [102, 68, 42], [170, 128, 78], [214, 182, 120],
                  [150, 70, 36], [150, 150, 150], [225, 225, 220]], np.float32) / 255
_IRIS = np.array([[70, 44, 26], [110, 72, 40], [60, 100, 150], [80, 120, 80], [120, 110, 60],
                  [100, 110, 120]], np.float32) / 255


@dataclass(frozen=True)
class SyntheticSpec:
    """What the built-in dataset contains; any change gives a different cache entry."""

    train_identities: int = 200
    test_identities: int = 40
    size: int = 128
    seed: int = 2024
    expressions: Tuple[str, ...] = DEFAULT_EXPRESSIONS
    ood_variants: Tuple[str, ...] = OOD_VARIANTS
    version: int = field(default=GENERATOR_VERSION)

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return f"builtin-v{self.version}-{hashlib.sha256(blob).hexdigest()[:12]}"


def cache_root() -> Path:
    """$REGGAN_CACHE, else $XDG_CACHE_HOME/reggan, else ~/.cache/reggan."""
    if os.environ.get("REGGAN_CACHE"):
        return Path(os.environ["REGGAN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "reggan"


# ---------------------------------------------------------------------------------------------
# Parameters


def _uniform(rng, lo, hi):
    return float(rng.uniform(lo, hi))


def identity_params(seed: int, index: int) -> Dict[str, np.ndarray]:
    """Face parameters of identity `index`, from its own random stream."""
    rng = np.random.default_rng([seed, index, 1])
    u = lambda lo, hi: _uniform(rng, lo, hi)  # noqa: E731
    skin_t = rng.beta(1.3, 1.8) * (len(_SKIN) - 1)
    lo = int(skin_t)
    skin = _SKIN[lo] + (_SKIN[min(lo + 1, len(_SKIN) - 1)] - _SKIN[lo]) * (skin_t - lo)
    skin = np.clip(skin * rng.uniform(0.96, 1.04, 3), 0, 1)
    hair = np.clip(_HAIR[rng.integers(len(_HAIR))] * rng.uniform(0.85, 1.15), 0, 1)
    light = np.array([u(-0.75, 0.75), u(-0.5, 0.2), 1.0])
    bg1, bg2 = (0.5 * rng.uniform(0.1, 1.0) + 0.5 * rng.uniform(0.1, 1.0, 3) for _ in range(2))
    return dict(
        cx=u(-0.03, 0.03), cy=u(0.0, 0.07),
        head_a=u(0.5, 0.6), head_b=u(0.66, 0.76), jaw=u(0.08, 0.32),
        skin=skin, hair=hair, hair_style=int(rng.integers(4)), hairline=u(0.32, 0.55),
        part=u(-0.3, 0.3), fringe=u(-0.18, 0.18), hair_volume=u(0.03, 0.09),
        eye_dx=u(0.2, 0.26), eye_y=u(-0.1, -0.03), eye_w=u(0.085, 0.11), eye_h=u(0.42, 0.54),
        eye_tilt=u(-0.02, 0.03), gaze=u(-0.02, 0.02), iris=_IRIS[rng.integers(len(_IRIS))],
        brow_gap=u(0.09, 0.125), brow_thick=u(0.022, 0.038), brow_arch=u(0.008, 0.035),
        nose_y=u(0.16, 0.23), nose_w=u(0.045, 0.07),
        mouth_y=u(0.36, 0.43), mouth_w=u(0.14, 0.19), lip_u=u(0.016, 0.028), lip_l=u(0.024, 0.04),
        lip_tint=u(0.2, 0.6),
        beard=u(0.25, 0.5) if rng.random() < 0.12 else 0.0,
        shirt=rng.uniform(0.05, 0.9, 3), bg1=bg1, bg2=bg2, bg_angle=u(0, 2 * np.pi),
        bg_waves=rng.uniform(-1, 1, (3, 4)),
        light=light / np.linalg.norm(light), ambient=u(0.5, 0.68),
        intensity=u(0.75, 1.2),
    )


def _stack(params: List[Dict]) -> Dict[str, np.ndarray]:
    """Per-identity dicts -> dict of arrays shaped (B, 1, 1[, ...]) for broadcasting over pixels."""
    out = {}
    for key in params[0]:
        values = np.asarray([p[key] for p in params], np.float32)
        out[key] = values.reshape(values.shape[:1] + (1, 1) + values.shape[1:])
    return out


def expression_params(name: str, intensity: np.ndarray) -> Dict[str, np.ndarray]:
    """Parameters of an expression, deltas from neutral scaled by each identity's intensity."""
    values = dict(_NEUTRAL)
    values.update(_EXPRESSION_PARAMS[name])
    return {k: _NEUTRAL[k] + (v - _NEUTRAL[k]) * intensity for k, v in values.items()}


# ---------------------------------------------------------------------------------------------
# Rendering


class _Canvas:
    """RGB images (B, H, W, 3) in [0, 1] with the pixel grid in face units."""

    def __init__(self, batch: int, size: int, extent: float = 0.86):
        coords = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1) * extent
        self.u = coords[None, None, :]
        self.v = coords[None, :, None]
        self.px = 2.0 * extent / size
        self.image = np.zeros((batch, size, size, 3), np.float32)
        self.foreground = np.zeros((batch, size, size), np.float32)

    def fill(self, distance):
        """Coverage of the region distance < 0, anti-aliased over one pixel."""
        return np.clip(0.5 - distance / self.px, 0.0, 1.0)

    def ellipse(self, cx, cy, a, b):
        r = np.sqrt(((self.u - cx) / a) ** 2 + ((self.v - cy) / b) ** 2)
        return self.fill((r - 1) * np.minimum(a, b))

    def paint(self, alpha, color, foreground=True):
        color = np.asarray(color, np.float32)
        self.image += alpha[..., None] * (color - self.image)
        if foreground:
            self.foreground += alpha * (1 - self.foreground)


def _between(canvas, top, bottom):
    """Coverage of top < v < bottom (curves in face units), zero where bottom <= top."""
    return canvas.fill(top - canvas.v) * canvas.fill(canvas.v - bottom)


def _render(p: Dict[str, np.ndarray], e: Dict[str, np.ndarray], size: int,
            grain: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    batch = p["cx"].shape[0]
    c = _Canvas(batch, size)
    u, v = c.u, c.v
    cx, cy, a, b = p["cx"], p["cy"], p["head_a"], p["head_b"]
    skin, hair = p["skin"], p["hair"]

    # Background: a two-colour gradient with low-frequency waves.
    ramp = np.clip(0.5 + 0.5 * (u * np.cos(p["bg_angle"]) + v * np.sin(p["bg_angle"])), 0, 1)
    waves = p["bg_waves"]
    wave = sum(0.03 * waves[..., k, 3] * np.sin(4 * (waves[..., k, 0] * u + waves[..., k, 1] * v)
                                                 + 3 * waves[..., k, 2]) for k in range(3))
    c.image[:] = p["bg1"] + (p["bg2"] - p["bg1"]) * ramp[..., None] + wave[..., None]

    # Long hair behind the head and shoulders.
    long_hair = (p["hair_style"] == 3).astype(np.float32)
    back = c.ellipse(cx, cy + 0.12, a + 0.13, b + 0.22) * c.fill(v - cy - 0.75)
    c.paint(back * long_hair, hair * 0.85)
    c.paint(c.ellipse(cx, 1.3, 1.0, 0.5), p["shirt"])
    c.paint(c.fill(np.abs(u - cx) - a * 0.42) * c.fill(cy + b * 0.3 - v), skin * 0.82)

    # Ears, then the head: an ellipse whose lower half narrows towards the chin.
    for side in (-1, 1):
        c.paint(c.ellipse(cx + side * a * 0.97, cy + p["eye_y"] + 0.06, 0.07, 0.12), skin * 0.92)
    below = np.clip((v - cy) / b, 0, 1)
    half_width = a * (1 - p["jaw"] * below ** 2)
    half_height = np.where(v > cy, b + e["jaw_drop"], b)
    r = np.sqrt(((u - cx) / half_width) ** 2 + ((v - cy) / half_height) ** 2)
    head = c.fill((r - 1) * a)
    c.paint(head, skin)

    ey = cy + p["eye_y"]
    mx, my = cx, cy + p["mouth_y"] + e["jaw_drop"] * 0.5
    ny = cy + p["nose_y"]
    mouth_half = p["mouth_w"] * e["mouth_width"]

    # Cheeks: blush and raised cheek highlight (happy), nasolabial folds.
    for side in (-1, 1):
        blush = c.ellipse(cx + side * (p["eye_dx"] + 0.03), ey + 0.19, 0.1, 0.065)
        c.paint(blush * 0.28 * e["cheek"] * head, np.array([0.85, 0.35, 0.35]) * skin + 0.1)
        fold_t = np.clip((v - ny) / (my - ny + 1e-6), 0, 1)
        fold_u = cx + side * (p["nose_w"] + 0.035 + (mouth_half + 0.02 - p["nose_w"] - 0.035)
                              * fold_t + 0.03 * np.sin(np.pi * fold_t))
        fold = c.fill(np.abs(u - fold_u) - 0.006) * c.fill(ny - 0.01 - v) * c.fill(v - my - 0.01)
        c.paint(fold * (0.1 + 0.45 * e["fold"]), skin * 0.6)

    # Forehead lines (raised brows) and chin tension (sad).
    for k in range(3):
        line_v = ey - p["brow_gap"] - 0.1 - 0.035 * k - e["brow_raise"]
        arc = line_v + 0.02 * ((u - cx) / 0.2) ** 2
        line = c.fill(np.abs(v - arc) - 0.004) * c.fill(np.abs(u - cx) - 0.2)
        c.paint(line * 0.4 * e["forehead"] * head, skin * 0.62)
    chin = c.ellipse(cx, cy + b + e["jaw_drop"] - 0.12, 0.06, 0.03)
    c.paint(chin * 0.3 * e["chin"] * head, skin * 0.7)

    # Nose: side shadow against the light, nostrils (flared in anger and disgust), wrinkles.
    shadow_side = -np.sign(p["light"][..., 0])
    bridge = np.exp(-((u - cx - shadow_side * 0.035) / 0.018) ** 2) * c.fill(ey - v) * c.fill(v - ny)
    c.paint(bridge * 0.22, skin * 0.6)
    c.paint(c.ellipse(cx, ny + 0.012, p["nose_w"] * 1.1, 0.03) * 0.18, skin * 0.55)
    for side in (-1, 1):
        nostril = c.ellipse(cx + side * p["nose_w"] * 0.6, ny - 0.004 * e["flare"],
                            0.02 * (1 + 0.35 * e["flare"]), 0.011)
        c.paint(nostril * 0.85, skin * 0.35)
    for k in range(3):
        arc = ey + 0.035 + 0.022 * k - 0.015 * (1 - ((u - cx) / 0.05) ** 2)
        wrinkle = c.fill(np.abs(v - arc) - 0.004) * c.fill(np.abs(u - cx) - 0.05)
        c.paint(wrinkle * 0.6 * e["wrinkle"], skin * 0.55)

    # Mouth. t runs across the mouth; curves are functions of t.
    t = (u - mx) / mouth_half
    q = np.clip(1 - t ** 2, 0, 1)
    inside = c.fill((np.abs(t) - 1) * mouth_half)
    centre = my - e["mouth_curve"] * t ** 2
    gap = e["mouth_open"] * q ** 0.6
    raise_ = e["lip_raise"] * np.sqrt(q) * (1 + 0.6 * e["asym"] * t)
    upper_inner = centre - 0.35 * gap - raise_
    lower_inner = centre + 0.65 * gap
    press = 1 - 0.6 * e["lip_press"]
    upper_outer = upper_inner - p["lip_u"] * (0.35 + 0.65 * np.sqrt(q)) * press
    lower_outer = lower_inner + p["lip_l"] * np.sqrt(q) * press
    tint = p["lip_tint"][..., None]
    lip_color = skin * (1 - 0.35 * tint) + np.array([0.55, 0.08, 0.12]) * 0.35 * tint
    c.paint(_between(c, upper_outer, lower_outer) * inside, lip_color * 0.9)
    c.paint(c.fill(np.abs(v - centre) - 0.005) * inside * 0.9, lip_color * 0.45)
    interior = _between(c, upper_inner, lower_inner) * inside
    c.paint(interior, np.array([0.32, 0.06, 0.08]))
    teeth_h = np.minimum(0.45 * gap + raise_, 0.04)
    upper_teeth = _between(c, upper_inner, upper_inner + teeth_h) * interior
    c.paint(upper_teeth * np.clip(e["teeth"], 0, 1), np.array([0.95, 0.93, 0.86]))

    # Eyes: almond between two lid curves, iris, pupil, highlight, lash line and crease.
    for side in (-1, 1):
        ex = cx + side * p["eye_dx"]
        s = (u - ex) / p["eye_w"]
        qs = np.clip(1 - s ** 2, 0, 1)
        centre_v = ey - p["eye_tilt"] * side * s
        height = p["eye_w"] * p["eye_h"]
        upper = centre_v - height * e["eye_open"] * qs ** 0.8
        lower = centre_v + height * 0.75 * e["eye_open"] * (1 - e["lower_lid"]) * qs ** 0.9
        span = c.fill((np.abs(s) - 1) * p["eye_w"])
        eye = _between(c, upper, lower) * span
        c.paint(eye, np.array([0.94, 0.93, 0.9]))
        radius = 0.44 * p["eye_w"]
        gx = ex + p["gaze"]
        c.paint(c.ellipse(gx, ey, radius, radius) * eye, p["iris"])
        c.paint(c.ellipse(gx, ey, radius * 0.45, radius * 0.45) * eye, np.zeros(3))
        c.paint(c.ellipse(gx - 0.3 * radius, ey - 0.35 * radius, 0.18 * radius, 0.18 * radius)
                * eye, np.ones(3))
        lash = c.fill(np.abs(v - upper + 0.004) - 0.0065) * c.fill((np.abs(s) - 1.05) * p["eye_w"])
        c.paint(lash * 0.9, hair * 0.3)
        crease = c.fill(np.abs(v - (upper - 0.03 * qs - 0.008)) - 0.004) * span
        c.paint(crease * 0.35, skin * 0.6)
        lid = c.fill(np.abs(v - lower - 0.01 * (1 + e["lower_lid"])) - 0.004) * span
        c.paint(lid * (0.15 + 0.4 * e["lower_lid"]), skin * 0.65)

        # Brow: inner end (towards the nose) tilted by brow_tilt, thicker than the outer end.
        bx = ex - side * e["brow_squeeze"]
        bs = (u - bx) / (p["eye_w"] * 1.3)
        inner = (1 - side * bs) / 2
        brow_v = (ey - p["brow_gap"] - e["brow_raise"] - (p["brow_arch"] + e["brow_arch"])
                  * (1 - bs ** 2) - e["brow_tilt"] * (inner - 0.3))
        thick = p["brow_thick"] * (0.55 + 0.45 * np.clip(inner, 0, 1))
        brow = c.fill(np.abs(v - brow_v) - thick / 2) * c.fill((np.abs(bs) - 1) * p["eye_w"])
        c.paint(brow * 0.95, hair * 0.75)

    # Hair on top: inside a slightly larger ellipse, above a hairline with a parting and fringe.
    style = p["hair_style"]
    volume = np.where(style == 0, 0.01, p["hair_volume"])
    cap = c.ellipse(cx, cy - 0.02, a + volume, b + volume * 0.8)
    hairline = cy - b * p["hairline"] + p["fringe"] * (u - cx - p["part"]) \
        - 0.25 * np.where(style == 2, 1.0, 0.0) * (1 - ((u - cx) / a) ** 2)
    top = cap * c.fill(v - hairline) * c.fill(v - (ey - 0.02))
    sides = cap * (1 - head) * c.fill(v - (cy + 0.1 * (style != 0)))
    hair_alpha = np.maximum(top, sides) * np.where(style == 0, 0.8, 1.0)
    c.paint(hair_alpha, hair)
    beard = head * np.clip((v - my + 0.08) / 0.08, 0, 1) * (1 - _between(c, upper_outer, lower_outer) * inside)
    c.paint(beard * p["beard"] * (0.8 + 0.2 * np.clip(grain, -1, 1)), hair * 0.8)

    # Lighting on the foreground from a per-identity direction; skin grain.
    nx = np.clip((u - cx) / (a * 1.15), -1, 1)
    ny_ = np.clip((v - cy) / (b * 1.15), -1, 1)
    nz = np.sqrt(np.clip(1 - nx ** 2 - ny_ ** 2, 0, 1))
    light = p["light"]
    lambert = np.clip(nx * light[..., 0] + ny_ * light[..., 1] + nz * light[..., 2], 0, 1)
    shade = p["ambient"] + (1.12 - p["ambient"]) * lambert
    c.image *= 1 + (c.foreground * (shade - 1))[..., None]
    c.image += (grain * 0.012 * c.foreground)[..., None]
    return np.clip(c.image, 0, 1), c.foreground


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def render_faces(first: int, count: int, seed: int = 2024, size: int = 128,
                 expressions=DEFAULT_EXPRESSIONS, with_masks: bool = False):
    """Render identities first..first+count-1 in every expression.

    Returns uint8 images (E, count, size, size, 3) and, with `with_masks`, float foreground
    masks (E, count, size, size).
    """
    params = [identity_params(seed, i) for i in range(first, first + count)]
    stacked = _stack(params)
    grain = np.stack([np.random.default_rng([seed, i, 2]).standard_normal((size, size))
                      for i in range(first, first + count)]).astype(np.float32)
    intensity = stacked["intensity"]
    images, masks = [], []
    for name in expressions:
        if name not in _EXPRESSION_PARAMS:
            raise ValueError(f"the built-in data has no expression {name!r}; it renders "
                             f"{', '.join(_EXPRESSION_PARAMS)}")
        image, mask = _render(stacked, expression_params(name, intensity), size, grain)
        images.append(_to_uint8(image))
        masks.append(mask)
    images = np.stack(images)
    return (images, np.stack(masks)) if with_masks else images


# ---------------------------------------------------------------------------------------------
# Out-of-distribution variants. Each takes float images (E, H, W, 3) of one subject, its masks
# (E, H, W) and a random stream, and applies one set of parameters to every expression.


def _sketch(images, masks, rng):
    from scipy.ndimage import gaussian_filter

    gray = images @ np.array([0.299, 0.587, 0.114], np.float32)
    blurred = gaussian_filter(1 - gray, sigma=(0, rng.uniform(2.0, 3.5), rng.uniform(2.0, 3.5)))
    sketch = np.clip(gray / np.maximum(1 - blurred, 1e-3), 0, 1) ** rng.uniform(2.0, 3.0)
    paper = rng.uniform(0.9, 1.0, 3).astype(np.float32)
    return sketch[..., None] * paper


def _color_light(images, masks, rng):
    angle = rng.uniform(np.pi / 3, 5 * np.pi / 3)
    axis = np.ones(3) / np.sqrt(3)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.cos(angle) * np.eye(3) + np.sin(angle) * cross \
        + (1 - np.cos(angle)) * np.outer(axis, axis)
    size = images.shape[1]
    coords = np.linspace(-1, 1, size, dtype=np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(direction) * coords[None, :] + np.sin(direction) * coords[:, None]
    light = np.clip(0.35 + 0.85 * (0.5 + 0.5 * ramp), 0.2, 1.3)
    cast = rng.uniform(0.75, 1.2, 3)
    out = (images @ rotation.T.astype(np.float32)) * light[None, :, :, None] * cast
    return np.clip(out, 0, 1) ** rng.uniform(0.7, 1.4)


def _noise_jpeg(images, masks, rng):
    noisy = images + rng.normal(0, rng.uniform(0.04, 0.08), images.shape).astype(np.float32)
    quality = int(rng.integers(10, 25))
    out = []
    for image in _to_uint8(noisy):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return np.stack(out).astype(np.float32) / 255


def _textures(size):
    from skimage import data

    textures = []
    for name in ("brick", "grass", "gravel"):
        texture = Image.fromarray(getattr(data, name)()).resize((2 * size, 2 * size),
                                                                Image.BILINEAR)
        textures.append(np.asarray(texture, np.float32) / 255)
    return textures


def _texture_bg(images, masks, rng, textures):
    size = images.shape[1]
    texture = textures[int(rng.integers(len(textures)))]
    y0, x0 = rng.integers(0, texture.shape[0] - size, 2)
    crop = texture[y0:y0 + size, x0:x0 + size, None]
    tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)
    background = np.clip((crop - crop.mean()) * rng.uniform(1.2, 2.0) + crop.mean(), 0, 1) * tint
    alpha = masks[..., None]
    return images * alpha + background[None] * (1 - alpha)


def _scale_rotate(images, masks, rng):
    size = images.shape[1]
    angle = np.deg2rad(rng.uniform(-18, 18))
    scale = rng.uniform(0.8, 1.2)
    shift = rng.uniform(-0.05, 0.05, 2) * size
    centre = size / 2
    # PIL maps output to input coordinates: x_in = A x_out + offset.
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    matrix = (cos, sin, centre - cos * (centre + shift[0]) - sin * (centre + shift[1]),
              -sin, cos, centre + sin * (centre + shift[0]) - cos * (centre + shift[1]))
    out = []
    for image in _to_uint8(images):
        border = tuple(int(x) for x in np.median(image[0], axis=0))
        warped = Image.fromarray(image).transform((size, size), Image.AFFINE, matrix,
                                                  resample=Image.BILINEAR, fillcolor=border)
        out.append(np.asarray(warped))
    return np.stack(out).astype(np.float32) / 255


def ood_variant(name: str, images: np.ndarray, masks: np.ndarray, seed: int, subject: int,
                textures=None) -> np.ndarray:
    """Variant `name` of one subject's uint8 images (E, H, W, 3), masks (E, H, W)."""
    rng = np.random.default_rng([seed, subject, 3, OOD_VARIANTS.index(name)])
    floats = images.astype(np.float32) / 255
    if name == "texture_bg":
        out = _texture_bg(floats, masks, rng, textures or _textures(images.shape[1]))
    else:
        out = {"sketch": _sketch, "color_light": _color_light, "noise_jpeg": _noise_jpeg,
               "scale_rotate": _scale_rotate}[name](floats, masks, rng)
    return _to_uint8(out)


# ---------------------------------------------------------------------------------------------
# Writing and caching


def subject_name(index: int) -> str:
    return f"id{index:04d}"


def _save_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="PNG", compress_level=1)


def _write_subject(folder: Path, expressions, images) -> None:
    folder.mkdir(parents=True)
    for name, image in zip(expressions, images):
        _save_png(folder / f"{name}.png", image)


def write_dataset(spec: SyntheticSpec, out_dir: Path, chunk: int = 64) -> None:
    """Render the whole dataset into `out_dir` (which must not exist yet)."""
    out_dir = Path(out_dir)
    textures = _textures(spec.size) if "texture_bg" in spec.ood_variants else None
    total = spec.train_identities + spec.test_identities
    for first in range(0, total, chunk):
        count = min(chunk, total - first)
        images, masks = render_faces(first, count, spec.seed, spec.size, spec.expressions,
                                     with_masks=True)
        for k in range(count):
            index = first + k
            split = "train" if index < spec.train_identities else "test"
            _write_subject(out_dir / split / subject_name(index), spec.expressions, images[:, k])
            if split == "test":
                for variant in spec.ood_variants:
                    variant_images = ood_variant(variant, images[:, k], masks[:, k], spec.seed,
                                                 index, textures)
                    _write_subject(out_dir / "ood" / variant / subject_name(index),
                                   spec.expressions, variant_images)
    (out_dir / "spec.json").write_text(json.dumps(asdict(spec), indent=2, sort_keys=True) + "\n")


def ensure_dataset(spec: SyntheticSpec = SyntheticSpec(), root: Path = None,
                   log=print) -> Path:
    """The dataset's folder, rendering it on first use. Safe when several processes race: each
    renders into its own temporary folder and the first rename wins."""
    root = Path(root) if root is not None else cache_root()
    target = root / spec.key()
    if (target / "spec.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    log(f"rendering the built-in dataset into {target} (first use only)")
    scratch = Path(tempfile.mkdtemp(prefix=".rendering-", dir=root))
    try:
        write_dataset(spec, scratch / "data")
        try:
            os.rename(scratch / "data", target)
        except OSError:
            if not (target / "spec.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
