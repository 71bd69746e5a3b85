"""Synthetic 2D polyp-like demo data set (no download; the default 200 images at 64 px take about 2 CPU seconds).

Each labeled sample is an RGB "endoscopy" image with one polyp (the label):

* mucosa: a per-image tissue colour and exposure, multiplicative low-frequency mottling, fine grain, a
  low-frequency illumination field (cosine ramp x off-centre vignette) and a few specular highlights;
* clutter: mucosal folds (brightness-only ridges 2-6 px wide), thin vessels (which absorb green/blue, so
  they are redder than the tissue), smooth reddish patches with half the polyp's colour change and pale
  mucus/bubble blobs — none of them carries the polyp's texture;
* polyp: a perturbed-radius star-convex blob covering about 4%-30% of the image, stretched and rotated, sometimes
  cut by the image border; the tissue under it turns redder and darker (green and blue multiplied by
  0.55-0.72 and 0.58-0.78, red by 0.92-1.08), with a multiplicative *pit texture*, dome shading, a cast
  shadow on the side away from the light, a soft boundary and highlights on its surface.

Why this is learnable yet not thresholdable: exposure, illumination and tissue colour vary between and within
images, and folds, vessels and reddish patches share parts of the polyp's appearance, so one global
threshold on a colour channel reaches a mean Dice of only 0.47 on the default set (predicting everything as
polyp: 0.24). The polyp is defined *relative to the tissue around it* — a colour ratio (in which the
illumination cancels) and a texture — which is what a convolutional network picks up in a few hundred
steps: a per-pixel logistic regression on five such local features already reaches 0.91 on the test split
(``tests/test_demo.py``). The quality predictor g has to look at the image too: whether a mask covers the
polyp cannot be told from the mask's shape, because every mask, true or corrupted, is a plausible blob.

The unlabeled pool comes from a shifted distribution: a yellower tissue palette, stronger illumination
fall-off, stronger texture and sensor noise and a gamma change.

Every sample ``i`` of a kind (``labeled``/``unlabeled``) is drawn from its own generator
``numpy.random.default_rng([seed, kind, i])``, so a sample does not depend on how many others are
generated, and PNGs are byte-identical for a seed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter
from scipy.ndimage import shift as shift_image
from tqdm import tqdm

from qgssl_monai.data.manifest import SPLIT_RATIOS, grouped_split, write_manifest

__all__ = [
    "DEMO_MANIFEST_NAME",
    "DemoStyle",
    "LABELED_STYLE",
    "UNLABELED_STYLE",
    "generate_demo_dataset",
    "render_demo_sample",
]

logger = logging.getLogger(__name__)

DEMO_MANIFEST_NAME = "manifest.json"
# sub-seed tags keeping labeled and unlabeled streams independent
_KIND_LABELED, _KIND_UNLABELED = 0, 1


@dataclass(frozen=True)
class DemoStyle:
    """Appearance statistics of one domain (all intensities on the [0, 1] scale before quantisation).

    Attributes:
        tissue_low, tissue_high: per-channel (R, G, B) range of the background base colour.
        polyp_gain_low, polyp_gain_high: per-channel range of the factor that turns the tissue colour under
            the polyp into the polyp's colour (R kept, G and B absorbed: redder and darker).
        polyp_texture: (low, high) amplitude of the polyp's multiplicative pit texture.
        exposure: (low, high) range of a per-image brightness factor applied to the tissue colour.
        illumination_amplitude: max amplitude of the cosine illumination ramp (fraction of intensity).
        vignette_strength: max darkening at the corners relative to the centre.
        mottling_amplitude: std of the low-frequency multiplicative background texture.
        grain_amplitude: std of the fine background grain.
        sensor_noise: std of the white noise added last.
        gamma: exponent applied to the final image (1 = none).
    """

    tissue_low: tuple[float, float, float]
    tissue_high: tuple[float, float, float]
    polyp_gain_low: tuple[float, float, float]
    polyp_gain_high: tuple[float, float, float]
    polyp_texture: tuple[float, float]
    exposure: tuple[float, float]
    illumination_amplitude: float
    vignette_strength: float
    mottling_amplitude: float
    grain_amplitude: float
    sensor_noise: float
    gamma: float


LABELED_STYLE = DemoStyle(
    tissue_low=(0.66, 0.32, 0.28),
    tissue_high=(0.94, 0.60, 0.52),
    polyp_gain_low=(0.92, 0.55, 0.58),
    polyp_gain_high=(1.08, 0.72, 0.78),
    polyp_texture=(0.06, 0.14),
    exposure=(0.6, 1.25),
    illumination_amplitude=0.3,
    vignette_strength=0.6,
    mottling_amplitude=0.06,
    grain_amplitude=0.012,
    sensor_noise=0.012,
    gamma=1.0,
)
# the unlabeled pool: another scanner/site — yellower tissue, harsher light, noisier, different gamma
UNLABELED_STYLE = DemoStyle(
    tissue_low=(0.72, 0.50, 0.28),
    tissue_high=(0.95, 0.70, 0.42),
    polyp_gain_low=(0.92, 0.60, 0.58),
    polyp_gain_high=(1.08, 0.82, 0.85),
    polyp_texture=(0.06, 0.16),
    exposure=(0.75, 1.1),
    illumination_amplitude=0.4,
    vignette_strength=0.9,
    mottling_amplitude=0.08,
    grain_amplitude=0.02,
    sensor_noise=0.025,
    gamma=0.8,
)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """White noise smoothed over the last two axes by a periodic Gaussian of ``sigma`` px, rescaled to unit std.

    Filtering in the Fourier domain costs the same for any ``sigma`` (a spatial kernel grows with it).
    """
    noise = rng.standard_normal(shape)
    freq_y = np.fft.fftfreq(shape[-2])[:, None]
    freq_x = np.fft.rfftfreq(shape[-1])[None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma) ** 2 * (freq_y**2 + freq_x**2))
    field = np.fft.irfft2(np.fft.rfft2(noise) * transfer, s=shape[-2:])
    return field / (field.std(axis=(-2, -1), keepdims=True) + 1e-8)


def _star_convex_blob(
    rng: np.random.Generator, grid_y: np.ndarray, grid_x: np.ndarray, area_fraction: float, touch_border: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A perturbed-radius star-convex shape on the unit square.

    Args:
        grid_y, grid_x: (H, W) pixel-centre coordinates in [0, 1).
        area_fraction: target area as a fraction of the image (approximate: harmonics add a little).
        touch_border: place the centre close enough to an edge for the shape to be cut by it.

    Returns:
        ``(mask, relative_radius)``: bool (H, W) shape and float (H, W) distance from the centre divided by
        the local boundary radius (< 1 inside; used for dome shading).
    """
    base_radius = float(np.sqrt(area_fraction / np.pi))
    if touch_border:
        centre = rng.uniform(0.0, 1.0, size=2)
        side = rng.integers(0, 4)
        offset = rng.uniform(0.0, 0.6 * base_radius)
        axis, high = divmod(int(side), 2)
        centre[axis] = 1.0 - offset if high else offset
    else:
        margin = min(0.45, base_radius)
        centre = rng.uniform(margin, 1.0 - margin, size=2)
    aspect = rng.uniform(0.6, 1.0)
    angle = rng.uniform(0.0, np.pi)
    dy, dx = grid_y - centre[0], grid_x - centre[1]
    # rotate then squash one axis; the area scale sqrt(aspect) keeps the target area
    u = (dx * np.cos(angle) + dy * np.sin(angle)) * np.sqrt(aspect)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / np.sqrt(aspect)
    distance = np.hypot(u, v)
    harmonics = np.arange(2, 7)  # k = 2..6: lobes and dents, no shift of the centre (k = 1)
    amplitudes = rng.uniform(0.0, 0.22, size=harmonics.size) / np.sqrt(harmonics - 1)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=harmonics.size)
    # sum_k a_k cos(k theta + phi_k) = Re(sum_k a_k e^{i phi_k} z^k) with z = e^{i theta}: powers, no trig per pixel
    direction = (u + 1j * v) / np.maximum(distance, 1e-12)
    power = direction.copy()  # z^1; multiplied up to z^2 .. z^6 below
    perturbation = np.zeros_like(distance)
    for amplitude, phase in zip(amplitudes, phases):
        power = power * direction
        perturbation += amplitude * (power * np.exp(1j * phase)).real
    radius = base_radius * (1.0 + perturbation)
    relative_radius = distance / np.maximum(radius, 1e-6)
    return relative_radius <= 1.0, relative_radius


def _curved_ridges(
    rng: np.random.Generator, grid_y: np.ndarray, grid_x: np.ndarray, count: int, width_px: tuple[float, float], size: int
) -> np.ndarray:
    """``count`` sinusoidal curves across the image, each a Gaussian ridge ``width_px`` wide; (count, H, W) in [0, 1]."""
    angles = rng.uniform(0.0, np.pi, size=count)[:, None, None]
    offsets = rng.uniform(-0.6, 0.6, size=count)[:, None, None]
    amplitudes = rng.uniform(0.02, 0.12, size=count)[:, None, None]
    frequencies = rng.uniform(0.5, 2.5, size=count)[:, None, None]
    phases = rng.uniform(0.0, 2.0 * np.pi, size=count)[:, None, None]
    widths = rng.uniform(*width_px, size=count)[:, None, None] / size
    y, x = grid_y - 0.5, grid_x - 0.5
    u = x * np.cos(angles) + y * np.sin(angles)
    v = -x * np.sin(angles) + y * np.cos(angles)
    distance = np.abs(v - (offsets + amplitudes * np.sin(2.0 * np.pi * frequencies * u + phases)))
    return np.exp(-((distance / widths) ** 2))


def _illumination(rng: np.random.Generator, grid_y: np.ndarray, grid_x: np.ndarray, style: DemoStyle) -> np.ndarray:
    """Multiplicative light field: a random cosine ramp times an off-centre vignette; (H, W) around 1."""
    amplitude = rng.uniform(0.3, 1.0) * style.illumination_amplitude
    frequency = rng.uniform(0.3, 1.0)
    direction = rng.uniform(0.0, 2.0 * np.pi)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    ramp = 1.0 + amplitude * np.cos(
        2.0 * np.pi * frequency * (grid_x * np.cos(direction) + grid_y * np.sin(direction)) + phase
    )
    light_y, light_x = rng.uniform(0.25, 0.75, size=2)
    falloff = rng.uniform(0.2, 1.0) * style.vignette_strength
    vignette = 1.0 - falloff * ((grid_y - light_y) ** 2 + (grid_x - light_x) ** 2)
    return ramp * np.clip(vignette, 0.2, None)


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Blurred copy of a bool mask (edge sharpness ``sigma`` px); float (H, W) in [0, 1]."""
    return np.clip(gaussian_filter(mask.astype(np.float64), sigma=sigma, mode="nearest"), 0.0, 1.0)


def render_demo_sample(rng: np.random.Generator, image_size: int, style: DemoStyle) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic image and its polyp mask.

    Args:
        rng: the sample's own generator (all randomness comes from it).
        image_size: side length S in pixels.
        style: domain statistics (:data:`LABELED_STYLE` or :data:`UNLABELED_STYLE`).

    Returns:
        ``(image, mask)``: uint8 (S, S, 3) RGB image and uint8 (S, S) mask in {0, 255}.
    """
    size = int(image_size)
    coords = (np.arange(size) + 0.5) / size
    grid_y, grid_x = np.meshgrid(coords, coords, indexing="ij")

    # mucosa: base colour x (multiplicative low-frequency mottling, mostly brightness) + fine grain
    # hue and brightness vary independently between images (exposure: a global threshold has no fixed level)
    tissue = rng.uniform(style.tissue_low, style.tissue_high)[:, None, None] * rng.uniform(*style.exposure)
    coarse = _smooth_noise(rng, (2, size, size), sigma=size / 10.0)
    tint_weights = np.array([0.3, 1.0, 0.8])[:, None, None]
    mottling = style.mottling_amplitude * (coarse[0] + 0.4 * coarse[1:2] * tint_weights)
    canvas = tissue * (1.0 + mottling) + style.grain_amplitude * _smooth_noise(rng, (3, size, size), sigma=0.7)
    # clutter that a single-channel threshold falls for: mucosal folds (brightness only, 2-6 px wide) and
    # thin vessels (absorb green/blue, so they are redder than the tissue too)
    folds = _curved_ridges(rng, grid_y, grid_x, int(rng.integers(1, 4)), (2.0, 6.0), size)
    fold_gain = rng.uniform(-0.3, 0.2, size=len(folds))[:, None, None]
    canvas = canvas * (1.0 + (fold_gain * folds).sum(axis=0))
    vessels = _curved_ridges(rng, grid_y, grid_x, int(rng.integers(2, 6)), (0.6, 1.4), size)
    vessel = np.clip((rng.uniform(0.3, 0.8, size=len(vessels))[:, None, None] * vessels).sum(axis=0), 0.0, 1.0)
    canvas = canvas * (1.0 - np.array([0.1, 0.35, 0.3])[:, None, None] * vessel)
    # smooth distractors without the polyp's pit texture: reddish flat patches (half the polyp's colour
    # change) and pale mucus/bubble blobs
    gain = rng.uniform(style.polyp_gain_low, style.polyp_gain_high)[:, None, None]
    for _ in range(int(rng.integers(0, 3))):
        blob, _ = _star_convex_blob(rng, grid_y, grid_x, rng.uniform(0.01, 0.06), bool(rng.random() < 0.3))
        alpha = _soft(blob, rng.uniform(1.5, 3.5))
        patch = np.sqrt(rng.uniform(style.polyp_gain_low, style.polyp_gain_high))[:, None, None]
        canvas = canvas * (1.0 - alpha + patch * alpha)
    for _ in range(int(rng.integers(0, 3))):
        blob, relative = _star_convex_blob(rng, grid_y, grid_x, rng.uniform(0.005, 0.03), False)
        alpha = _soft(blob, rng.uniform(0.6, 1.5)) * rng.uniform(0.3, 0.7)
        canvas = canvas * (1.0 - alpha) + np.array([0.95, 0.92, 0.8])[:, None, None] * alpha

    # the polyp: the tissue under it turned redder and darker, with a pit texture, dome shading and a cast
    # shadow on the side away from the light
    area_fraction = float(np.exp(rng.uniform(np.log(0.04), np.log(0.30))))
    mask, relative = _star_convex_blob(rng, grid_y, grid_x, area_fraction, bool(rng.random() < 0.15))
    light = rng.uniform(0.0, 2.0 * np.pi)
    shift = rng.uniform(1.0, 2.5) * np.array([np.sin(light), np.cos(light)])
    cast = shift_image(mask.astype(np.float64), shift, order=1, mode="constant", cval=0.0) > 0.5  # no wrap-around
    shadow = _soft(cast, 1.5) * rng.uniform(0.1, 0.3)
    canvas = canvas * (1.0 - shadow)
    pits = np.tanh(1.5 * _smooth_noise(rng, (1, size, size), sigma=rng.uniform(0.8, 1.3)))
    texture = 1.0 + rng.uniform(*style.polyp_texture) * pits
    dome = 1.0 + rng.uniform(0.0, 0.2) * np.clip(1.0 - relative**2, 0.0, 1.0)
    alpha = _soft(mask, rng.uniform(0.4, 1.2))
    canvas = canvas * (1.0 - alpha + gain * texture * dome * alpha)

    canvas = canvas * _illumination(rng, grid_y, grid_x, style)
    for on_polyp in [True] * int(rng.integers(0, 3)) + [False] * int(rng.integers(0, 3)):  # specular highlights
        candidates = np.argwhere(mask) if on_polyp and mask.any() else None
        if candidates is not None:
            spot_y, spot_x = (candidates[rng.integers(len(candidates))] + 0.5) / size
        else:
            spot_y, spot_x = rng.uniform(0.05, 0.95, size=2)
        spot_sigma = rng.uniform(0.5, 1.5) / size
        spot = np.exp(-((grid_y - spot_y) ** 2 + (grid_x - spot_x) ** 2) / (2.0 * spot_sigma**2))
        canvas = canvas + rng.uniform(0.3, 0.8) * spot
    canvas = canvas + style.sensor_noise * rng.standard_normal(canvas.shape)
    canvas = np.clip(canvas, 0.0, 1.0) ** style.gamma
    image = np.round(canvas.transpose(1, 2, 0) * 255.0).astype(np.uint8)
    return image, mask.astype(np.uint8) * 255


def _write_png(array: np.ndarray, path: Path) -> None:
    """Save a uint8 array as PNG with fixed encoder settings (equal arrays give equal bytes; fast zlib level)."""
    Image.fromarray(array).save(path, format="PNG", optimize=False, compress_level=1)


def _digest(paths: Iterable[Path]) -> str:
    """SHA-256 over the bytes of ``paths`` in the given order (identifies the generated content)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def generate_demo_dataset(
    out_dir: str | os.PathLike, *, n_labeled: int = 100, n_unlabeled: int = 100, image_size: int = 64, seed: int = 0
) -> Path:
    """Write the synthetic demo data set and its manifest.

    Layout under ``out_dir``: ``images/demo_000.png`` (RGB), ``masks/demo_000.png`` ({0, 255}, mode L),
    ``unlabeled/unlabeled_000.png`` (RGB) and ``manifest.json``: a MONAI datalist whose ``training`` /
    ``validation`` / ``test`` lists split the labeled samples 70:10:20 by a ``seed``-permutation
    (:func:`qgssl_monai.data.manifest.grouped_split`), ``unlabeled`` lists the pool, all paths relative to
    ``out_dir``; header ``name="demo"``, ``split_seed``, ``split_rule``, ``num_*``, the generator settings
    and ``content_sha256`` (hash of every written PNG, to check a regeneration).

    Args:
        out_dir: output folder (created; demo files of an earlier generation there are replaced or removed).
        n_labeled: labeled image/mask pairs (>= 3 so every split can be non-empty).
        n_unlabeled: images in the shifted unlabeled pool (>= 0).
        image_size: square side in pixels (>= 16).
        seed: generator and split seed; the same seed gives byte-identical files.

    Returns:
        Path of the written ``manifest.json``.

    Raises:
        ValueError: a count or the size is out of range.
    """
    if n_labeled < 3:
        raise ValueError(f"n_labeled must be >= 3 (one per labeled split), got {n_labeled}")
    if n_unlabeled < 0:
        raise ValueError(f"n_unlabeled must be >= 0, got {n_unlabeled}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 px, got {image_size}")
    root = Path(out_dir)
    folders = {name: root / name for name in ("images", "masks", "unlabeled")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    labeled: dict[str, dict[str, str]] = {}
    digits = max(3, len(str(max(n_labeled, n_unlabeled) - 1)))
    progress = tqdm(total=n_labeled + n_unlabeled, desc="demo data", unit="img", leave=False, disable=None)
    for index in range(n_labeled):
        image, mask = render_demo_sample(np.random.default_rng([seed, _KIND_LABELED, index]), image_size, LABELED_STYLE)
        stem = f"demo_{index:0{digits}d}"
        _write_png(image, folders["images"] / f"{stem}.png")
        _write_png(mask, folders["masks"] / f"{stem}.png")
        written += [folders["images"] / f"{stem}.png", folders["masks"] / f"{stem}.png"]
        labeled[f"images/{stem}.png"] = {"image": f"images/{stem}.png", "label": f"masks/{stem}.png"}
        progress.update()
    unlabeled: list[dict[str, str]] = []
    for index in range(n_unlabeled):
        sample_rng = np.random.default_rng([seed, _KIND_UNLABELED, index])
        image, _ = render_demo_sample(sample_rng, image_size, UNLABELED_STYLE)
        name = f"unlabeled/unlabeled_{index:0{digits}d}.png"
        _write_png(image, root / name)
        written.append(root / name)
        unlabeled.append({"image": name})
        progress.update()
    progress.close()
    # a previous, larger generation in the same folder must not leave stale samples behind
    fresh = set(written)
    prefixes = {"images": "demo_", "masks": "demo_", "unlabeled": "unlabeled_"}
    for name, prefix in prefixes.items():
        for stale in folders[name].glob(f"{prefix}*.png"):
            if stale not in fresh and stale.stem[len(prefix) :].isdigit():
                stale.unlink()

    split_keys = grouped_split(list(labeled), seed=seed, ratios=SPLIT_RATIOS)
    splits = {name: [labeled[key] for key in keys] for name, keys in split_keys.items()}
    splits["unlabeled"] = unlabeled
    manifest = write_manifest(
        root / DEMO_MANIFEST_NAME,
        splits,
        data_root=root,
        name="demo",
        modality="synthetic RGB (polyp/lesion-like)",
        source="generated by qgssl_monai.data.demo.generate_demo_dataset",
        citation="",
        licence="Apache-2.0 (generated data)",
        split_seed=int(seed),
        split_rule=(
            "labeled samples split 70:10:20 (training:validation:test) by a numpy default_rng(split_seed) "
            "permutation (qgssl_monai.data.manifest.grouped_split, one group per image); unlabeled = the "
            "shifted-distribution pool"
        ),
        extra={
            "generator": {
                "n_labeled": int(n_labeled),
                "n_unlabeled": int(n_unlabeled),
                "image_size": int(image_size),
                "seed": int(seed),
            },
            "content_sha256": _digest(written),
        },
    )
    logger.info("demo data set: %d labeled + %d unlabeled %d px images in %s", n_labeled, n_unlabeled, image_size, root)
    return manifest
