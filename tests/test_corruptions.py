"""Type 1 mask corruptions: each op on hand-built masks, exact Dice targets, category frequencies,
reproducibility (one process and 2 DataLoader workers), size scaling, swap pool, and the Dice range
of the default mix on the real masks."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.utils import set_determinism
from PIL import Image
from scipy import ndimage

from qgssl_monai.transforms import corruption_ops as ops
from qgssl_monai.transforms.corruptions import (
    CATEGORIES,
    DEFAULT_CATEGORY_PROBS,
    RandMaskCorruption,
    RandMaskCorruptiond,
)

BACKENDS = ["scipy"] + (["opencv"] if ops.cv2 is not None else [])


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with the OpenCV accelerator and with the scipy fallback."""
    monkeypatch.setattr(ops, "USE_OPENCV", request.param == "opencv")
    return request.param


def disk(size: int, radius: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    """Boolean disk of ``radius`` pixels (pixel centres within the radius)."""
    cy, cx = centre if centre is not None else ((size - 1) / 2.0, (size - 1) / 2.0)
    rows, cols = np.mgrid[:size, :size]
    return (rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2


def rng(seed: int = 0) -> np.random.RandomState:
    return np.random.RandomState(seed)


# ------------------------------------------------------------------------------------------------
# pure ops
# ------------------------------------------------------------------------------------------------
def test_dice_score_exact_and_empty():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert ops.dice_score(a, b) == 1.0
    a[0, :3] = True  # 3 px
    b[0, 1:] = True  # 3 px, 2 shared
    assert ops.dice_score(a, b) == pytest.approx(4 / 6)
    assert ops.dice_score(a, np.zeros_like(a)) == 0.0


def test_dice_score_backends_agree_on_random_and_strided_masks(backend: str):
    # the OpenCV path counts bytes of uint8 views; it must give the numpy answer bit for bit, and inputs it cannot
    # view (strided, non-bool, 3D) must take the numpy path
    state = np.random.RandomState(7)
    for fill_a, fill_b in ((0.3, 0.6), (0.0, 0.2), (0.5, 0.0), (0.9, 0.9)):
        a, b = state.rand(37, 53) < fill_a, state.rand(37, 53) < fill_b
        area_a, area_b, shared = a.sum(), b.sum(), (a & b).sum()
        expected = 1.0 if area_a + area_b == 0 else 2.0 * shared / (area_a + area_b)
        assert ops.dice_score(a, b) == expected
        assert ops.dice_score(a[:, ::2], b[:, ::2]) == ops.dice_score(a[:, ::2].copy(), b[:, ::2].copy())
        assert ops.dice_score(a.astype(np.float32), b.astype(np.uint8)) == expected
        assert ops.dice_score(a[None], b[None]) == expected
    with pytest.raises(ValueError, match="equal shapes"):
        ops.dice_score(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


def test_category_draw_boundaries():
    # a uniform draw u picks the first category whose cumulative probability exceeds u
    transform = RandMaskCorruption(category_probs={"identity": 0.25, "catastrophic": 0.25, "blob": 0.5})

    class FixedUniform(np.random.RandomState):
        def __init__(self, value: float) -> None:
            super().__init__(0)
            self.value = value

        def rand(self, *size: int):  # the category draw is the second rand() (the first is RandomizableTransform's)
            return self.value if not size else super().rand(*size)

    for value, category in ((0.0, "identity"), (0.2499, "identity"), (0.25, "catastrophic"), (0.5, "blob"),
                            (0.9999, "blob")):
        transform.set_random_state(state=FixedUniform(value))
        transform.randomize(None)
        assert transform._category == category, value


@pytest.mark.parametrize("radius_px", [3.0, 5.0, 12.0])
def test_erode_and_dilate_match_euclidean_distance(backend: str, radius_px: float):
    mask = disk(96, 25.0)
    radius = radius_px / 96.0  # side of a 96 x 96 image is 96
    eroded = ops.erode(mask, rng(), radius=radius)
    dilated = ops.dilate(mask, rng(), radius=radius)
    # exactly the pixels farther than r from the background / within r of the object
    assert np.array_equal(eroded, ndimage.distance_transform_edt(mask) > radius_px + 1e-6)
    assert np.array_equal(dilated, ndimage.distance_transform_edt(~mask) <= radius_px + 1e-6)
    # and close to the analytic disks (the digital disk's edge lies between R and R + 1 pixel centres)
    assert np.pi * (25.0 - radius_px) ** 2 < eroded.sum() < np.pi * (26.0 - radius_px) ** 2
    assert np.pi * (25.0 + radius_px - 0.5) ** 2 < dilated.sum() < np.pi * (25.0 + radius_px + 0.5) ** 2


def test_opening_removes_thin_spur_and_closing_fills_gap(backend: str):
    mask = disk(64, 15.0)
    spurred = mask.copy()
    spurred[31:33, 46:60] = True  # 2 px wide spur
    opened = ops.opening(spurred, rng(), radius=3 / 64)
    assert not opened[31:33, 50:60].any()
    assert opened[20:44, 20:44].sum() == mask[20:44, 20:44].sum()  # the body survives
    notched = mask.copy()
    notched[30:34, 16:32] = False  # 4 px wide slot into the disk
    closed = ops.closing(notched, rng(), radius=4 / 64)
    assert closed[30:34, 20:32].all()


def test_translate_shifts_centroid_by_drawn_offset():
    mask = np.zeros((80, 80), bool)
    mask[30:50, 20:40] = True  # 20 x 20 box
    dy, dx = ops.translation_pixels(mask, 0.25, -0.3)
    assert (dy, dx) == (5, -6)
    moved = ops.translate(mask, rng(), shift_y=0.25, shift_x=-0.3)
    before = np.array(ndimage.center_of_mass(mask))
    after = np.array(ndimage.center_of_mass(moved))
    np.testing.assert_allclose(after - before, [5, -6])
    assert moved.sum() == mask.sum()
    # shifted out of the image: pixels are lost
    assert not ops.translate(mask, rng(), shift_y=5.0, shift_x=0.0).any()


def test_catastrophic_ops():
    mask = disk(32, 8.0)
    np.testing.assert_array_equal(ops.invert(mask, rng()), ~mask)
    assert not ops.empty(mask, rng()).any()
    assert ops.full(mask, rng()).all()
    noisy = ops.noise(mask, rng(3), fill=0.3, grain=0.2)
    assert 0.2 < noisy.mean() < 0.4


def test_bounding_box_and_convex_hull(backend: str):
    mask = np.zeros((40, 40), bool)
    mask[5:30, 8:12] = True
    mask[26:30, 8:35] = True  # an L shape
    box = ops.bounding_box(mask, rng())
    expected = np.zeros_like(mask)
    expected[5:30, 8:35] = True
    np.testing.assert_array_equal(box, expected)
    hull = ops.convex_hull(mask, rng())
    assert (hull >= mask).all() and (hull <= box).all()
    # the hull adds the triangle between the two arms: roughly half the missing box area
    missing = box.sum() - mask.sum()
    assert 0.35 * missing < hull.sum() - mask.sum() < 0.65 * missing


def three_squares() -> np.ndarray:
    mask = np.zeros((50, 50), bool)
    mask[2:12, 2:12] = True  # 100 px
    mask[20:40, 20:40] = True  # 400 px
    mask[44:48, 2:6] = True  # 16 px
    return mask


def test_keep_largest_and_drop_component(backend: str):
    mask = three_squares()
    largest = ops.keep_largest(mask, rng())
    expected = np.zeros_like(mask)
    expected[20:40, 20:40] = True
    np.testing.assert_array_equal(largest, expected)
    dropped = ops.drop_component(mask, rng(1))
    assert dropped.sum() in {mask.sum() - 100, mask.sum() - 400, mask.sum() - 16}
    assert (dropped <= mask).all()
    single = disk(30, 6.0)
    np.testing.assert_array_equal(ops.drop_component(single, rng()), single)


def test_holes_stay_inside_and_islands_add(backend: str):
    mask = disk(64, 20.0)
    holed = ops.holes(mask, rng(2), count=3, radius=0.04)
    assert (holed <= mask).all() and holed.sum() < mask.sum()
    grown = ops.islands(mask, rng(2), count=3, radius=0.04)
    assert (grown >= mask).all() and grown.sum() > mask.sum()
    both = ops.holes_and_islands(mask, rng(5), count=3, radius=0.04)
    assert (both & ~mask).any() and (mask & ~both).any()


def test_random_disks_equal_the_direct_disk_definition():
    # the vectorised run painter must give exactly the union of {(r - r_k)^2 + (c - c_k)^2 <= rad_k^2}
    grid_r, grid_c = np.mgrid[:50, :70]
    for seed in range(40):
        draw = np.random.RandomState(seed)
        count = draw.randint(0, 9)
        centres = np.stack([draw.uniform(-8, 58, count), draw.uniform(-8, 78, count)], 1)
        if seed % 3 == 0:  # integer centres and radii hit the exact-boundary cases
            centres = np.rint(centres)
        radius = float(np.rint(draw.uniform(1, 9))) if seed % 3 == 0 else float(draw.uniform(0.2, 9))
        out = ops._random_disks((50, 70), rng(seed), centres, radius)
        radii = np.maximum(radius * rng(seed).uniform(0.5, 1.5, size=count), 0.5)  # same draws as the op
        expected = np.zeros((50, 70), bool)
        for (row, col), rad in zip(centres, radii):
            expected |= (grid_r - row) ** 2 + (grid_c - col) ** 2 <= rad * rad
        np.testing.assert_array_equal(out, expected, err_msg=f"seed {seed}")


def test_holes_and_islands_paint_exactly_the_drawn_disks():
    # holes/islands paint disk pixels straight into a copy of the mask: same result as combining with the disk image
    mask = disk(64, 20.0, (30.0, 34.0)) | disk(64, 6.0, (55.0, 8.0))
    for seed in range(5):
        state = rng(seed)
        rows, cols = ops._random_foreground_pixels(mask, state, 3, ops._bbox(mask))
        expected_holes = mask & ~ops._random_disks(mask.shape, state, np.stack([rows, cols], 1), 0.05 * 64)
        np.testing.assert_array_equal(ops.holes(mask, rng(seed), count=3, radius=0.05), expected_holes)
        state = rng(seed)
        box = ops._bbox(mask)
        r0, r1 = max(box[0] - (box[1] - box[0]), 0), min(box[1] + (box[1] - box[0]), 64)
        c0, c1 = max(box[2] - (box[3] - box[2]), 0), min(box[3] + (box[3] - box[2]), 64)
        centres = np.stack([state.randint(r0, r1, size=3), state.randint(c0, c1, size=3)], 1)
        expected_islands = mask | ops._random_disks(mask.shape, state, centres, 0.05 * 64)
        np.testing.assert_array_equal(ops.islands(mask, rng(seed), count=3, radius=0.05), expected_islands)
        assert not np.array_equal(expected_islands, mask) and not np.array_equal(expected_holes, mask)
    strided = np.asfortranarray(mask)[:, ::-1]  # non-contiguous input: the op must not paint into a view of it
    before = strided.copy()
    ops.holes_and_islands(strided, rng(0), count=4, radius=0.05)
    np.testing.assert_array_equal(strided, before)


def test_nonzero_matches_numpy_order_on_views():
    state = np.random.RandomState(3)
    for shape in ((1, 1), (5, 9), (40, 23)):
        mask = state.rand(*shape) < 0.3
        for view in (mask, mask[:, ::-1], mask.T, np.zeros_like(mask)):
            rows, cols = ops._nonzero(view)
            expected_rows, expected_cols = np.nonzero(view)
            np.testing.assert_array_equal(rows, expected_rows)
            np.testing.assert_array_equal(cols, expected_cols)
            assert rows.dtype == expected_rows.dtype


def test_random_foreground_pixels_are_uniform_over_the_object():
    mask = np.zeros((40, 40), bool)
    mask[5:15, 5:35] = True  # compact: rejection sampling in the box
    mask[30, 2] = True  # makes the box 26 x 33 with 301 of 858 pixels set
    box = ops._bbox(mask)
    rows, cols = ops._random_foreground_pixels(mask, rng(3), 6000, box)
    assert rows.shape == (6000,) and mask[rows, cols].all()
    counts = np.bincount(rows * 40 + cols, minlength=1600)[mask.ravel()]
    assert counts.size == 301 and counts.min() > 0 and abs(counts.mean() - 6000 / 301) < 1e-9
    assert counts.std() < 2.0 * np.sqrt(6000 / 301)  # multinomial spread, not a biased pick
    sparse = np.zeros((40, 40), bool)
    sparse[np.arange(40), np.arange(40)] = True  # fills 1/40 of its box: exact fallback
    rows, cols = ops._random_foreground_pixels(sparse, rng(0), 50, ops._bbox(sparse))
    assert (rows == cols).all()


def test_opening_on_tight_crop_equals_wide_crop(backend: str):
    # opening lies inside the mask, so the bounding box + 1 px ring gives the same result as a radius-wide margin
    mask = ndimage.gaussian_filter(np.random.RandomState(1).rand(80, 80), 4) > 0.5
    mask[:, :2] = True
    for radius in (0.02, 0.1, 0.25):
        r = radius * 80
        wide = ops._crop_apply(mask, int(np.ceil(r)) + 1, lambda crop: ops._dilate_px(ops._erode_px(crop, r), r))
        np.testing.assert_array_equal(ops.opening(mask, rng(), radius=radius), wide)


def test_centroid_and_ellipse_moments_match_scipy(backend: str):
    mask = ndimage.gaussian_filter(np.random.RandomState(2).rand(64, 64), 4) > 0.52
    np.testing.assert_allclose(ops._centroid(mask), ndimage.center_of_mass(mask), rtol=0, atol=1e-9)
    # a uniform ellipse has variance a^2 / 4 along its axis: the fit (semi-axis 2 sqrt(var)) recovers it
    grid_r, grid_c = np.mgrid[:64, :64] - np.array([30.3, 33.6])[:, None, None]
    t = np.deg2rad(35.0)
    along, across = grid_r * np.cos(t) + grid_c * np.sin(t), -grid_r * np.sin(t) + grid_c * np.cos(t)
    ellipse = (along / 22.0) ** 2 + (across / 11.0) ** 2 <= 1.0
    fitted = ops.ellipse_fit(ellipse, rng(), scale=1.0)
    np.testing.assert_allclose(ndimage.center_of_mass(fitted), ndimage.center_of_mass(ellipse), atol=0.15)
    assert ops.dice_score(ellipse, fitted) > 0.97


def test_every_op_handles_empty_full_and_one_pixel_wide_masks(backend: str):
    empty, full, diagonal = np.zeros((40, 48), bool), np.ones((40, 48), bool), np.eye(40, 48, dtype=bool)
    for name, op in ops.MASK_CORRUPTION_OPS.items():
        for strength in ops.STRENGTHS:
            params = op.sample_params(rng(1), strength)
            for mask in (empty, full, diagonal):
                out = op.fn(mask, rng(0), **params)
                assert out.dtype == bool and out.shape == mask.shape and out is not mask, name
            if name not in ("islands", "holes_and_islands", "invert", "full", "noise"):
                assert not op.fn(empty, rng(0), **params).any(), name  # nothing to degrade stays nothing


def test_dropout_removes_a_rectangle():
    mask = np.zeros((60, 60), bool)
    mask[10:50, 10:50] = True
    out = ops.dropout(mask, rng(4), height=0.25, width=0.5)
    removed = mask & ~out
    assert (out <= mask).all()
    rows, cols = np.nonzero(removed)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    assert removed[r0:r1, c0:c1].all() and removed.sum() == (r1 - r0) * (c1 - c0)  # a full rectangle
    assert r1 - r0 == 10 and c1 - c0 == 20  # 25% x 50% of the 40 px box, inside the object


def test_scale_and_rotate_about_centroid(backend: str):
    mask = disk(100, 12.0, centre=(40.0, 55.0))
    bigger = ops.scale(mask, rng(), factor=1.5)
    assert bigger.sum() == pytest.approx(mask.sum() * 2.25, rel=0.04)
    np.testing.assert_allclose(ndimage.center_of_mass(bigger), (40.0, 55.0), atol=0.5)
    bar = np.zeros((64, 64), bool)
    bar[28:36, 12:52] = True  # 8 x 40 bar
    turned = ops.rotate(bar, rng(), angle=90.0)
    rows, cols = np.nonzero(turned)
    assert rows.max() - rows.min() + 1 == 40 and cols.max() - cols.min() + 1 == 8
    assert turned.sum() == bar.sum()


def test_shape_approximations(backend: str):
    rows, cols = np.mgrid[:80, :80]
    ellipse = ((rows - 40) / 25.0) ** 2 + ((cols - 38) / 12.0) ** 2 <= 1
    assert ops.dice_score(ellipse, ops.ellipse_fit(ellipse, rng())) > 0.97
    square = np.zeros((80, 80), bool)
    square[20:60, 20:60] = True
    triangle = ops.polygon_fit(square, rng(0), vertices=3)
    octagon = ops.polygon_fit(square, rng(0), vertices=8)
    assert triangle.sum() < octagon.sum() <= square.sum() + 2 * 40
    assert ops.dice_score(square, octagon) > ops.dice_score(square, triangle)
    assert ops.dice_score(square, octagon) > 0.85


def test_boundary_textures_stay_near_the_boundary(backend: str):
    mask = disk(96, 25.0)
    band_px = 0.02 * 96
    noisy = ops.boundary_noise(mask, rng(1), band=0.02, flip_prob=0.5)
    changed = noisy ^ mask
    distance_to_edge = np.minimum(ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask))
    assert changed.any() and distance_to_edge[changed].max() <= band_px + 1.0
    for name in ("jagged", "elastic", "grid_distortion"):
        params = ops.MASK_CORRUPTION_OPS[name].sample_params(rng(7), "mild")
        out = ops.apply_mask_op(name, mask, rng(9), **params)
        assert 0.75 < ops.dice_score(mask, out) < 1.0, name
        np.testing.assert_array_equal(out, ops.apply_mask_op(name, mask, rng(9), **params))  # rng-determined


def test_smooth_removes_thin_protrusion(backend: str):
    mask = disk(64, 15.0)
    mask[31:33, 46:62] = True
    smoothed = ops.smooth(mask, rng(), sigma=2 / 64)
    assert not smoothed[31:33, 52:62].any()
    assert smoothed[25:39, 25:39].all()


def test_blobs_keep_area_and_position(backend: str):
    mask = np.zeros((100, 100), bool)
    mask[30:50, 40:80] = True  # 800 px, centroid (39.5, 59.5)
    blobs = (ops.disk_blob(mask, rng(), at_centroid=True), ops.gaussian_blob(mask, rng(), aspect=2.0, at_centroid=True))
    for blob in blobs:
        assert blob.sum() == pytest.approx(800, rel=0.05)
        np.testing.assert_allclose(ndimage.center_of_mass(blob), (39.5, 59.5), atol=0.7)
    elsewhere = ops.disk_blob(mask, rng(3), at_centroid=False)
    assert elsewhere.sum() == pytest.approx(800, rel=0.05)
    assert not np.allclose(ndimage.center_of_mass(elsewhere), (39.5, 59.5), atol=2.0)


def test_registry_ops_are_pure_and_backends_agree():
    mask = ndimage.gaussian_filter(np.random.RandomState(0).rand(72, 72), 5) > 0.52
    for name, op in ops.MASK_CORRUPTION_OPS.items():
        for strength in ops.STRENGTHS:
            params = op.sample_params(rng(11), strength)
            original = mask.copy()
            outputs = []
            for use_cv2 in (False, True) if ops.cv2 is not None else (False,):
                ops.USE_OPENCV = use_cv2
                try:
                    out = op.fn(mask, rng(5), **params)
                finally:
                    ops.USE_OPENCV = ops.cv2 is not None
                assert out.dtype == bool and out.shape == mask.shape, name
                np.testing.assert_array_equal(mask, original)  # input untouched
                outputs.append(out)
            # OpenCV and scipy paths agree up to a few boundary pixels (polygon/hull rasterisation)
            assert (outputs[0] ^ outputs[-1]).sum() <= 0.01 * mask.size, name
    with pytest.raises(KeyError, match="unknown mask corruption op"):
        ops.apply_mask_op("melt", mask, rng())
    with pytest.raises(ValueError, match="strength"):
        ops.MASK_CORRUPTION_OPS["erode"].sample_params(rng(), "medium")


@pytest.mark.parametrize(
    "name,params",
    [
        ("erode", {"radius": 0.05}),
        ("dilate", {"radius": 0.05}),
        ("grid_distortion", {"steps": 5, "limit": 0.4}),
        ("smooth", {"sigma": 0.05}),
        ("translate", {"shift_y": 0.3, "shift_x": 0.2}),
        ("scale", {"factor": 0.7}),
        ("holes", {"count": 3, "radius": 0.04}),
        ("elastic", {"amplitude": 0.06, "spacing": 0.25}),
        ("jagged", {"amplitude": 0.02, "wavelength": 0.04}),
        ("boundary_noise", {"band": 0.02, "flip_prob": 0.4}),
    ],
)
def test_damage_scales_with_image_size(name: str, params: dict):
    small, large = disk(64, 18.0), disk(256, 72.0)
    dice_small = np.mean([ops.dice_score(small, ops.apply_mask_op(name, small, rng(s), **params)) for s in range(3)])
    dice_large = np.mean([ops.dice_score(large, ops.apply_mask_op(name, large, rng(s), **params)) for s in range(3)])
    assert dice_small < 0.99 and abs(dice_small - dice_large) < 0.06, (dice_small, dice_large)


# ------------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------------
def blob_label(size: int = 48, seed: int = 0) -> np.ndarray:
    smooth = ndimage.gaussian_filter(np.random.RandomState(seed).rand(size, size), size / 10)
    return (smooth > np.quantile(smooth, 0.8))[None].astype(np.float32)


def test_quality_is_exact_dice_for_every_category():
    labels = [blob_label(48, s) for s in range(6)]
    pool = [blob_label(48, s)[0] for s in range(6, 12)]
    transform = RandMaskCorruption(mask_pool=pool)
    transform.set_random_state(0)
    seen = set()
    for i in range(300):
        label = labels[i % len(labels)]
        mask, quality, corruption = transform(label)
        assert mask.dtype == np.float32 and mask.shape == (1, 48, 48)
        assert set(np.unique(mask)) <= {0.0, 1.0}
        y, m = label[0] > 0.5, mask[0] > 0.5
        inter, total = np.logical_and(y, m).sum(), y.sum() + m.sum()
        expected = 1.0 if total == 0 else 2.0 * inter / total
        assert quality.dtype == torch.float32 and quality.ndim == 0
        assert float(quality) == pytest.approx(expected, abs=1e-6)
        seen.add(corruption.split(":")[0])
    assert seen == set(CATEGORIES)


def test_dictionary_transform_keys_types_and_collation():
    label = MetaTensor(torch.from_numpy(blob_label(32, 1)), meta={"filename_or_obj": "case_1.png"})
    transform = RandMaskCorruptiond(keys="label", category_probs={"single": 1.0})
    transform.set_random_state(3)
    out = transform({"label": label, "image": torch.zeros(3, 32, 32)})
    assert isinstance(out["mask"], MetaTensor) and out["mask"].dtype == torch.float32
    assert out["mask"].meta["filename_or_obj"] == "case_1.png"
    assert out["corruption"].startswith("single:")
    assert float(out["quality"]) == pytest.approx(ops.dice_score(label[0].numpy() > 0.5, out["mask"][0].numpy() > 0.5))
    batch = torch.utils.data.default_collate([transform({"label": label}) for _ in range(4)])
    assert batch["quality"].shape == (4,) and batch["quality"].dtype == torch.float32
    assert batch["mask"].shape == (4, 1, 32, 32)
    plain = transform({"label": torch.from_numpy(blob_label(32, 2))})["mask"]
    assert type(plain) is torch.Tensor and plain.dtype == torch.float32
    # empty label: identity gives 1.0, catastrophic "full" gives 0.0
    empty = np.zeros((1, 16, 16), np.float32)
    assert float(RandMaskCorruption(category_probs={"identity": 1.0})(empty).quality) == 1.0
    full = RandMaskCorruption(category_probs={"catastrophic": 1.0}, ops=None)
    full.set_random_state(0)
    qualities = {round(float(full(empty).quality), 6) for _ in range(20)}
    assert qualities <= {0.0, 1.0}


def test_category_probabilities_are_honoured():
    probs = {"identity": 0.1, "single": 0.3, "chain": 0.15, "heavy": 0.2, "catastrophic": 0.1, "blob": 0.15}
    transform = RandMaskCorruption(category_probs=probs)
    transform.set_random_state(123)
    n = 3000
    counts = dict.fromkeys(CATEGORIES, 0)
    for _ in range(n):
        transform.randomize(None)
        counts[transform.describe().split(":")[0]] += 1
    assert counts["swap"] == 0
    for category, p in probs.items():
        standard_error = np.sqrt(p * (1 - p) / n)
        assert abs(counts[category] / n - p) < 4 * standard_error, (category, counts[category] / n, p)


def test_default_probabilities_and_missing_pool_warning():
    assert sum(DEFAULT_CATEGORY_PROBS.values()) == pytest.approx(1.0)
    with pytest.warns(UserWarning, match="swap"):
        transform = RandMaskCorruption()
    assert transform.category_probs["swap"] == 0.0
    assert sum(transform.category_probs.values()) == pytest.approx(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RandMaskCorruption(mask_pool=[np.ones((4, 4))]).category_probs["swap"] > 0
        assert RandMaskCorruptiond(swap_pool_key="pool").corrupter.category_probs["swap"] > 0


def test_invalid_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown corruption categories"):
        RandMaskCorruption(category_probs={"melt": 1.0})
    with pytest.raises(ValueError, match="unknown mask corruption ops"):
        RandMaskCorruption(ops=["erode", "dilate", "smooth", "melt"])
    with pytest.raises(ValueError, match=r"\(1, H, W\)"):
        RandMaskCorruption(category_probs={"single": 1.0})(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="exactly one"):
        RandMaskCorruptiond(keys=["label", "other"])
    with pytest.raises(KeyError, match="swap_pool_key"):
        RandMaskCorruptiond(swap_pool_key="pool", category_probs={"swap": 1.0})({"label": blob_label(16)})
    with pytest.raises(FileNotFoundError, match="no_such_mask.png"):
        RandMaskCorruption(category_probs={"swap": 1.0}, mask_pool=["no_such_mask.png"])(blob_label(16))


def test_reproducible_in_process_and_replay():
    label = blob_label(40, 2)
    pool = [blob_label(40, s)[0] for s in range(3, 8)]
    first, second = RandMaskCorruption(mask_pool=pool), RandMaskCorruption(mask_pool=pool)
    first.set_random_state(42)
    second.set_random_state(42)
    runs = [[first(label) for _ in range(40)], [second(label) for _ in range(40)]]
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a.mask, b.mask)
        assert float(a.quality) == float(b.quality) and a.corruption == b.corruption
    # randomize=False replays the last corruption exactly (ops' internal randomness is seeded in randomize)
    again = first(label, randomize=False)
    np.testing.assert_array_equal(again.mask, runs[0][-1].mask)
    assert len({r.corruption for r in runs[0]}) > 5


def _loader_qualities(num_workers: int) -> tuple[np.ndarray, np.ndarray]:
    set_determinism(seed=7)
    data = [{"label": blob_label(32, s)} for s in range(12)]
    transform = RandMaskCorruptiond(keys="label", category_probs={"single": 0.5, "chain": 0.3, "blob": 0.2})
    loader = DataLoader(Dataset(data, transform), batch_size=3, num_workers=num_workers, shuffle=False)
    qualities, masks = [], []
    for batch in loader:
        qualities.append(batch["quality"].numpy())
        masks.append(batch["mask"].numpy())
    set_determinism(seed=None)
    return np.concatenate(qualities), np.concatenate(masks)


def test_reproducible_across_two_dataloader_workers():
    q1, m1 = _loader_qualities(num_workers=2)
    q2, m2 = _loader_qualities(num_workers=2)
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_array_equal(m1, m2)
    assert q1.shape == (12,) and len(np.unique(np.round(q1, 6))) > 6  # not one corruption repeated


def test_swap_picks_closest_area_from_file_pool(tmp_path: Path):
    label = np.zeros((1, 32, 32), np.float32)
    label[0, 8:20, 8:20] = 1  # 144 px
    paths = []
    for side in (4, 10, 13, 20):  # squares of 2*side px written at 64 px: about side^2 px once resized to 32
        big = np.zeros((64, 64), np.uint8)
        big[36 : 36 + 2 * side, 2 : 2 + 2 * side] = 255
        path = tmp_path / f"mask_{side}.png"
        Image.fromarray(big).save(path)
        paths.append(str(path))
    transform = RandMaskCorruption(category_probs={"swap": 1.0}, mask_pool=paths, swap_candidates=4)
    transform.set_random_state(0)
    mask, quality, corruption = transform(label)
    assert corruption == "swap"
    rows, cols = np.nonzero(mask[0])
    # the 13-px square (about 169 px, the closest area to 144) from the resized 64-px file
    assert abs(mask[0].sum() - 169) <= 2 * 13 and rows.min() == 18 and cols.min() == 1
    assert float(quality) == pytest.approx(ops.dice_score(label[0] > 0.5, mask[0] > 0.5))
    # per-sample pool from the data dictionary; the label itself is skipped
    d = RandMaskCorruptiond(category_probs={"swap": 1.0}, swap_pool_key="pool", swap_candidates=2)
    d.set_random_state(1)
    other = np.zeros((32, 32), np.float32)
    other[0:5, 0:5] = 1
    out = d({"label": label, "pool": [label[0], other]})
    np.testing.assert_array_equal(out["mask"][0], other)
    assert float(out["quality"]) == 0.0


@pytest.mark.realdata
def test_default_mix_spans_every_dice_bin_on_real_masks(real_data_root: Path):
    # real_data_root (conftest): ../shared/data beside the checkout, skips when absent
    paths = sorted((real_data_root / "kvasir-seg" / "masks").glob("*.png"))[:100] + sorted(
        (real_data_root / "cvc-clinicdb" / "masks").glob("*.png")
    )[:60]
    masks = [np.asarray(Image.open(p).convert("L").resize((128, 128), Image.BILINEAR)) > 127 for p in paths]
    transform = RandMaskCorruption(mask_pool=masks)
    transform.set_random_state(0)
    n = 1500
    qualities = np.array([float(transform(masks[i % len(masks)][None].astype(np.float32)).quality) for i in range(n)])
    fractions = np.histogram(qualities, bins=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])[0] / n
    assert (fractions >= 0.10).all(), fractions


def test_strength_and_chain_length_settings():
    transform = RandMaskCorruption(
        category_probs={"chain": 1.0}, heavy_share={"chain": 0.0}, chain_length={"chain": (4, 4)}
    )
    transform.set_random_state(0)
    for _ in range(50):
        transform.randomize(None)
        names = transform.describe().split(":")[1].split("+")
        assert len(names) == 4 and len(set(names)) == 4  # distinct ops
    with pytest.raises(ValueError, match="heavy_share"):
        RandMaskCorruption(heavy_share={"chain": 1.5})
    with pytest.raises(ValueError, match="chain_length"):
        RandMaskCorruption(chain_length={"heavy": (3, 2)})
    with pytest.raises(ValueError, match="at least 3 ops"):
        RandMaskCorruption(ops={"erode": 1.0, "dilate": 1.0, "smooth": 0.0})


@pytest.mark.skipif(ops.cv2 is None, reason="OpenCV accelerator not installed")
def test_morphology_backends_identical_at_image_border():
    mask = ndimage.gaussian_filter(np.random.RandomState(0).rand(72, 72), 5) > 0.5
    mask[:, :3] = True
    mask[-2:, :] = True  # touches two image borders: outside the image is neither object nor background
    for radius in (0.03, 0.08, 0.2):  # disk-filter path (< 11.5 px) and distance-transform path
        for op in (ops.erode, ops.dilate, ops.opening, ops.closing):
            results = []
            for use_cv2 in (True, False):
                ops.USE_OPENCV = use_cv2
                try:
                    results.append(op(mask, rng(), radius=radius))
                finally:
                    ops.USE_OPENCV = True
            np.testing.assert_array_equal(results[0], results[1], err_msg=f"{op.__name__} r={radius}")


@pytest.mark.skipif(ops.cv2 is None, reason="OpenCV accelerator not installed")
def test_smooth_backends_identical_at_image_border():
    # cv2.BORDER_REFLECT repeats the edge pixel, as scipy's mode="reflect" does ("mirror" would not)
    mask = ndimage.gaussian_filter(np.random.RandomState(3).rand(72, 72), 5) > 0.5
    mask[:, :4] = True
    results = []
    for use_cv2 in (True, False):
        ops.USE_OPENCV = use_cv2
        try:
            results.append(ops.smooth(mask, rng(), sigma=0.05))
        finally:
            ops.USE_OPENCV = True
    np.testing.assert_array_equal(results[0], results[1])


# ------------------------------------------------------------------------------------------------
# speed paths: the same draws and the same masks as the plain numpy formulations
# ------------------------------------------------------------------------------------------------
def test_uniform_and_choice_helpers_draw_exactly_like_numpy():
    # the samplers use ops._uniform / ops._choice instead of rng.uniform / rng.choice: same values, same stream
    ours, numpys = rng(3), rng(3)
    for k in range(2000):
        low, high = (-0.15 * k % 7, 0.02 + 0.37 * (k % 11)) if k % 2 else (10.0, 45.0)
        assert ops._uniform(ours, low, high) == numpys.uniform(low, high)
        options = (3, 5, 8) if k % 3 else (-1.0, 1.0)
        assert ops._choice(ours, options) == numpys.choice(list(options))
    assert ours.random_sample() == numpys.random_sample()  # the streams are still in step


def test_linspace_and_interpolation_matrix_match_numpy_linspace():
    for stop in (0.0, 1.0, 7.0, 13.7, 223.0):
        for num in (1, 2, 3, 8, 150, 224):
            np.testing.assert_array_equal(ops._linspace_from_zero(stop, num), np.linspace(0.0, stop, num))
    for n_out, n_in in ((1, 1), (1, 4), (5, 1), (7, 2), (150, 8), (224, 51), (37, 37)):
        weights = ops._interpolation_matrix(n_out, n_in)
        # the former construction, spelled out with np.linspace
        expected = np.zeros((n_out, n_in), np.float32)
        if n_in == 1:
            expected[:, 0] = 1
        else:
            pos = np.linspace(0.0, n_in - 1.0, n_out)
            lo = np.minimum(np.floor(pos).astype(np.intp), n_in - 2)
            frac = 0.5 - 0.5 * np.cos(np.pi * (pos - lo))
            expected[np.arange(n_out), lo] = 1.0 - frac
            expected[np.arange(n_out), lo + 1] += frac
        np.testing.assert_array_equal(weights, expected)
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
        assert not weights.flags.writeable  # cached and shared


def _polygon_fit_full_sort(mask: np.ndarray, offset: float, vertices: int) -> np.ndarray:
    """polygon_fit's vertex choice with one lexsort over every boundary pixel (the former formulation)."""
    box = ops._bbox(mask)
    crop = mask[box[0] : box[1], box[2] : box[3]]
    rows, cols = np.nonzero(ops._inner_boundary(crop))
    rows, cols = rows + box[0], cols + box[2]
    centre_r, centre_c = ops._centroid(mask, box)
    dr, dc = rows - centre_r, cols - centre_c
    step = 2.0 * np.pi / vertices
    relative = np.mod(np.arctan2(dr, dc) - offset + step / 2.0, 2.0 * np.pi)
    sector = np.minimum((relative / step).astype(np.intp), vertices - 1)
    order = np.lexsort((-(dr * dr + dc * dc), np.abs(relative - (sector + 0.5) * step), sector))
    first = order[np.r_[True, sector[order][1:] != sector[order][:-1]]]
    return ops._fill_polygon(mask.shape, rows[first].astype(np.float64), cols[first].astype(np.float64))


@pytest.mark.parametrize("vertices", [3, 4, 5, 8])
def test_polygon_fit_keeps_the_full_sort_choice_with_ties(backend: str, vertices: int):
    # a centred square and a centred disk are symmetric: many boundary pixels tie in angle and distance, so the
    # pre-filter of polygon_fit must keep every tie and break it like the full lexsort (farthest, then scan order)
    square = np.zeros((41, 41), bool)
    square[10:31, 10:31] = True
    rows, cols = np.mgrid[:50, :60]
    lobes = ((rows - 20) ** 2 + (cols - 18) ** 2 <= 100) | ((rows - 30) ** 2 / 4 + (cols - 40) ** 2 <= 60)
    for mask in (square, disk(41, 12.0), lobes):
        for seed in range(6):
            offset = rng(seed).uniform(0.0, 2.0 * np.pi)
            expected = _polygon_fit_full_sort(mask, offset, vertices)
            np.testing.assert_array_equal(ops.polygon_fit(mask, rng(seed), vertices=vertices), expected)
    # offset 0 on the square, 4 vertices: sectors centred on the axes; the corners of the inscribed diamond are the
    # edge midpoints (exact ties in distance are broken by scan order, identically)
    diamond = ops.polygon_fit(square, FixedOffset(0.0), vertices=4)
    np.testing.assert_array_equal(diamond, _polygon_fit_full_sort(square, 0.0, 4))
    assert diamond[20, 10] and diamond[20, 30] and diamond[10, 20] and diamond[30, 20] and not diamond[10, 10]


class FixedOffset(np.random.RandomState):
    """A RandomState whose uniform draws are all ``u`` scaled into the requested range (here: the start angle)."""

    def __init__(self, angle: float) -> None:
        super().__init__(0)
        self.angle = angle

    def random_sample(self, size=None):  # type: ignore[override]
        return self.angle / (2.0 * np.pi)


def test_affine_ops_map_pixels_by_the_inverse_matrix(backend: str):
    # scale/rotate/random_affine now do the 2 x 2 algebra on Python floats: check them against the backward map
    # out[p] = mask[rint(c + A^-1 (p - c - shift))] computed here with numpy
    mask = np.zeros((64, 64), bool)
    mask[20:40, 14:30] = True
    mask[24:28, 30:44] = True
    box = ops._bbox(mask)
    centre = np.array(ops._centroid(mask, box))

    def backward(matrix: np.ndarray, shift: tuple[int, int] = (0, 0)) -> np.ndarray:
        rows, cols = np.mgrid[:64, :64].astype(np.float64)
        rel = np.stack([rows - centre[0] - shift[0], cols - centre[1] - shift[1]])
        src = np.einsum("ij,jhw->ihw", np.linalg.inv(matrix), rel) + centre[:, None, None]
        ri, ci = np.rint(src[0]).astype(int), np.rint(src[1]).astype(int)
        inside = (ri >= 0) & (ri < 64) & (ci >= 0) & (ci < 64)
        return mask[np.clip(ri, 0, 63), np.clip(ci, 0, 63)] & inside

    def agree(out: np.ndarray, expected: np.ndarray) -> None:
        # nearest-neighbour ties (source exactly between pixels) may round either way: allow a handful
        assert (out ^ expected).sum() <= 3, (out ^ expected).sum()

    agree(ops.scale(mask, rng(), factor=1.4), backward(np.eye(2) * 1.4))
    t = np.deg2rad(35.0)
    rotation = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    agree(ops.rotate(mask, rng(), angle=35.0), backward(rotation))
    params = {"angle": -20.0, "scale_y": 1.2, "scale_x": 0.8, "shear": 0.2, "shift_y": 0.1, "shift_x": -0.25}
    t = np.deg2rad(params["angle"])
    matrix = (
        np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        @ np.array([[1.0, params["shear"]], [0.0, 1.0]])
        @ np.diag([params["scale_y"], params["scale_x"]])
    )
    shift = ops.translation_pixels(mask, params["shift_y"], params["shift_x"])
    assert shift == ops.translation_pixels(mask, params["shift_y"], params["shift_x"], box) == (2, -8)
    agree(ops.random_affine(mask, rng(), **params), backward(matrix, shift))
    assert ops.random_affine(np.zeros((8, 8), bool), rng(), **params).sum() == 0


def test_draw_order_is_unchanged_for_a_fixed_seed():
    # pins the category/op/parameter draws of seed 2024 (as drawn before the speed work): changing the RNG draw order
    # would silently change every seeded experiment's Type 1 masks
    transform = RandMaskCorruption(
        category_probs={"single": 0.3, "chain": 0.3, "heavy": 0.3, "catastrophic": 0.05, "blob": 0.05}
    )
    transform.set_random_state(2024)
    described, seeds = [], []
    for _ in range(12):
        transform.randomize(None)
        described.append(transform.describe())
        seeds.append(transform._op_seed)
        if len(described) == 2:
            second_plan = transform._plan
    assert described == [
        "heavy:boundary_noise+opening+dilate",
        "chain:random_affine+holes_and_islands+opening",
        "single:holes_and_islands",
        "single:holes",
        "chain:opening+rotate+grid_distortion",
        "chain:grid_distortion+translate+scale",
        "single:grid_distortion",
        "heavy:grid_distortion+holes_and_islands",
        "chain:scale+holes",
        "single:scale",
        "heavy:translate+erode",
        "catastrophic:empty",
    ]
    assert seeds[:4] == [538138344, 1392416819, 909090884, 1016442122] and seeds[-1] == 767602271
    affine = second_plan[0][1]
    assert affine["angle"] == 10.847971244693984 and affine["shift_x"] == -0.08613309852231273
    assert second_plan[1][1] == {"count": 7, "radius": 0.0623685509407846}
