"""2D IO chains: every mask encoding, intensity scaling, channels, resize, metadata, augmentation, NIfTI."""

from __future__ import annotations

import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, decollate_batch
from monai.transforms import Compose, Invertd, LoadImaged
from PIL import Image

from qgssl_monai.data.manifest import load_split
from qgssl_monai.transforms.io import (
    EnsureImageChannels,
    NormalizeBinaryMask,
    RasterImageReader,
    ScaleToUnitRange,
    get_seg_transforms,
    get_unlabeled_transforms,
    mask_converter,
    original_spatial_shape,
    restore_original_size,
)

# non-square on purpose: a transposed load would change the shape
HEIGHT, WIDTH = 24, 40


def _object() -> np.ndarray:
    """bool (24, 40) mask: an L-shaped object (asymmetric, so flips/transposes show)."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[4:20, 6:14] = True
    mask[14:20, 14:33] = True
    return mask


def _write_nifti(array: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, affine=np.eye(4)), str(path))
    return path


def _mask_files(tmp_path: Path) -> dict[str, Path]:
    """The same object in every mask encoding we accept."""
    obj = _object()
    files: dict[str, Path] = {}

    def save(name: str, image: Image.Image, **kwargs) -> None:
        files[name] = tmp_path / name
        image.save(files[name], **kwargs)

    save("u8_0_255.png", Image.fromarray(obj.astype(np.uint8) * 255))
    save("u8_0_1.png", Image.fromarray(obj.astype(np.uint8)))
    save("u16_0_65535.png", Image.fromarray(obj.astype(np.uint16) * 65535))
    save("bit.png", Image.fromarray(obj))  # mode "1"
    rgb = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    rgb[obj] = (200, 30, 30)  # red object
    save("rgb_red.png", Image.fromarray(rgb))
    transparent = np.full((HEIGHT, WIDTH, 4), 255, dtype=np.uint8)  # white everywhere, alpha = object
    transparent[..., 3] = obj * 255
    save("rgba_alpha_only.png", Image.fromarray(transparent))
    coloured_alpha = np.zeros((HEIGHT, WIDTH, 4), dtype=np.uint8)  # green object, opaque black background
    coloured_alpha[obj] = (0, 255, 0, 255)
    coloured_alpha[~obj, 3] = 255
    save("rgba_green.png", Image.fromarray(coloured_alpha))
    palette = Image.fromarray(obj.astype(np.uint8), mode="L").convert("P")
    palette.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 white, index 1 black: indices must win
    save("palette.png", palette)
    save("noisy.jpg", Image.fromarray(obj.astype(np.uint8) * 255), quality=40)
    save("mask.bmp", Image.fromarray(obj.astype(np.uint8) * 255))
    save("mask.tif", Image.fromarray(obj.astype(np.uint8) * 255))
    files["mask.nii.gz"] = _write_nifti(obj.astype(np.uint8), tmp_path / "mask.nii.gz")
    return files


MASK_ENCODINGS = [
    "u8_0_255.png", "u8_0_1.png", "u16_0_65535.png", "bit.png", "rgb_red.png", "rgba_alpha_only.png",
    "rgba_green.png", "palette.png", "noisy.jpg", "mask.bmp", "mask.tif", "mask.nii.gz",
]  # fmt: skip


@pytest.mark.parametrize("name", MASK_ENCODINGS)
def test_every_mask_encoding_normalises_to_the_same_binary_mask(tmp_path: Path, name: str) -> None:
    path = _mask_files(tmp_path)[name]
    reader = RasterImageReader(converter=mask_converter)
    load = LoadImaged(keys="label", reader=reader, dtype=None, ensure_channel_first=True)
    mask = NormalizeBinaryMask()(load({"label": str(path)})["label"])
    assert mask.shape == (1, HEIGHT, WIDTH) and mask.dtype == torch.float32
    np.testing.assert_array_equal(mask[0].numpy(), _object().astype(np.float32))
    assert mask.meta["filename_or_obj"] == str(path)


def test_full_chain_on_every_mask_encoding_gives_identical_labels(tmp_path: Path) -> None:
    files = _mask_files(tmp_path)
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)).save(image)
    chain = get_seg_transforms(32, train=False)
    labels = [chain({"image": str(image), "label": str(files[name])})["label"] for name in MASK_ENCODINGS]
    for name, label in zip(MASK_ENCODINGS, labels):
        assert label.shape == (1, 32, 32) and label.dtype == torch.float32, name
        assert torch.equal(label, labels[0]), name
    assert set(labels[0].unique().tolist()) == {0.0, 1.0}


def test_normalize_binary_mask_edge_cases() -> None:
    normalise = NormalizeBinaryMask()
    assert torch.equal(normalise(torch.zeros(1, 4, 4, dtype=torch.uint8)), torch.zeros(1, 4, 4))  # empty stays empty
    assert torch.equal(normalise(torch.full((1, 3, 3), 255, dtype=torch.uint8)), torch.ones(1, 3, 3))  # all foreground
    soft = torch.tensor([[[0.0, 0.2, 0.5, 0.6, 1.0]]])  # threshold is > max / 2
    assert normalise(soft).tolist() == [[[0.0, 0.0, 0.0, 1.0, 1.0]]]
    assert normalise(np.array([[[0, 3, 7, 9]]])).tolist() == [[[0.0, 0.0, 1.0, 1.0]]]  # numpy in, half max = 4.5
    with pytest.raises(ValueError, match="5 channels"):
        normalise(torch.zeros(5, 2, 2))


def test_intensity_scaling_by_dtype() -> None:
    scale = ScaleToUnitRange()
    assert torch.allclose(scale(torch.tensor([0, 51, 255], dtype=torch.uint8)), torch.tensor([0.0, 0.2, 1.0]))
    # MONAI holds uint16 images as int32
    assert torch.allclose(scale(torch.tensor([0, 13107, 65535], dtype=torch.int32)), torch.tensor([0.0, 0.2, 1.0]))
    floats = torch.tensor([0.25, 0.75], dtype=torch.float64)
    assert torch.equal(scale(floats), floats.float())
    assert scale(torch.tensor([True, False])).tolist() == [1.0, 0.0]
    twelve_bit = ScaleToUnitRange(max_value=4095)(torch.tensor([0, 4095], dtype=torch.int32))
    assert torch.allclose(twelve_bit, torch.tensor([0.0, 1.0]))


def test_channel_conventions() -> None:
    grey = torch.rand(1, 5, 6)
    assert torch.equal(EnsureImageChannels(rgb=True)(grey), grey.repeat(3, 1, 1))
    assert torch.equal(EnsureImageChannels(rgb=False)(grey), grey)
    rgba = torch.rand(4, 5, 6)
    assert torch.equal(EnsureImageChannels(rgb=True)(rgba), rgba[:3])
    luma = EnsureImageChannels(rgb=False)(torch.tensor([[[1.0]], [[0.5]], [[0.0]]]))
    assert luma.shape == (1, 1, 1) and luma.item() == pytest.approx(0.299 + 0.5 * 0.587)
    with pytest.raises(ValueError, match="5 channels"):
        EnsureImageChannels()(torch.zeros(5, 2, 2))


def _image_files(tmp_path: Path) -> tuple[np.ndarray, dict[str, Path]]:
    """A (24, 40, 3) uint8 RGB pattern saved in several formats; grey variants hold its red channel."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    names = ("rgb.png", "rgb.bmp", "rgb.tif", "rgba.png", "grey.png", "grey16.png", "palette.png", "grey.nii.gz")
    files = {name: tmp_path / name for name in names}
    Image.fromarray(rgb).save(files["rgb.png"])
    Image.fromarray(rgb).save(files["rgb.bmp"])
    Image.fromarray(rgb).save(files["rgb.tif"])
    Image.fromarray(np.dstack([rgb, np.full((HEIGHT, WIDTH), 7, np.uint8)])).save(files["rgba.png"])
    Image.fromarray(rgb[..., 0]).save(files["grey.png"])
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(files["grey16.png"])  # 16-bit with the same /max values
    Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.MAXCOVERAGE).save(files["palette.png"])
    _write_nifti(rgb[..., 0].astype(np.float32) / 255.0, files["grey.nii.gz"])
    return rgb, files


def test_images_load_scaled_channel_first_in_natural_orientation(tmp_path: Path) -> None:
    rgb, files = _image_files(tmp_path)
    expected_rgb = torch.as_tensor(rgb.transpose(2, 0, 1).astype(np.float32) / 255.0)
    expected_grey = expected_rgb[:1]
    chain_rgb = Compose(get_unlabeled_transforms(HEIGHT, train=False).transforms[:3])  # load, scale, channels
    chain_grey = Compose(get_unlabeled_transforms(HEIGHT, train=False, rgb=False).transforms[:3])
    for name in ("rgb.png", "rgb.bmp", "rgb.tif", "rgba.png"):
        image = chain_rgb({"image": str(files[name])})["image"]
        assert image.dtype == torch.float32 and torch.allclose(image, expected_rgb), name
        assert original_spatial_shape(image) == (HEIGHT, WIDTH)
    for name in ("grey.png", "grey16.png", "grey.nii.gz"):
        grey = chain_grey({"image": str(files[name])})["image"]
        assert grey.shape == (1, HEIGHT, WIDTH) and torch.allclose(grey, expected_grey, atol=1e-6), name
        assert original_spatial_shape(grey) == (HEIGHT, WIDTH), name
        assert torch.allclose(chain_rgb({"image": str(files[name])})["image"], expected_grey.repeat(3, 1, 1), atol=1e-6)
    palette = chain_rgb({"image": str(files["palette.png"])})["image"]
    assert palette.shape == (3, HEIGHT, WIDTH)  # palette indices expanded to colours, not kept as one channel
    assert (palette - expected_rgb).abs().mean() < 0.05


def test_resize_to_square_and_thin_structures_survive(tmp_path: Path) -> None:
    image_path, mask_path = tmp_path / "image.jpg", tmp_path / "mask.png"
    Image.fromarray(np.full((96, 128, 3), 128, dtype=np.uint8)).save(image_path)
    line = np.zeros((128, 128), dtype=np.uint8)
    line[2:4, :] = 255  # 2-px line: nearest 4x down-sampling (rows 0, 4, 8, ...) would drop it
    Image.fromarray(line).save(mask_path)
    out = get_seg_transforms(32, train=False)({"image": str(image_path), "label": str(mask_path)})
    assert out["image"].shape == (3, 32, 32) and out["image"].dtype == torch.float32
    assert torch.allclose(out["image"], torch.full((3, 32, 32), 128 / 255), atol=2 / 255)
    expected = torch.zeros(1, 32, 32)
    expected[0, 0] = 1.0
    assert torch.equal(out["label"].as_tensor(), expected)
    assert original_spatial_shape(out["image"]) == (96, 128) and original_spatial_shape(out["label"]) == (128, 128)


def test_restore_original_size_and_invertd(tmp_path: Path) -> None:
    files = _mask_files(tmp_path)
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)).save(image)
    chain = get_seg_transforms(64, train=False)
    out = chain({"image": str(image), "label": str(files["u8_0_255.png"])})
    restored = restore_original_size(out["label"], out["image"])
    assert restored.shape == (1, HEIGHT, WIDTH)
    np.testing.assert_array_equal(restored[0].numpy(), _object().astype(np.float32))
    assert restore_original_size(out["label"], {"spatial_shape": (12, 20)}).shape == (1, 12, 20)
    probabilities = restore_original_size(out["label"] * 0.8, (HEIGHT, WIDTH), threshold=None)
    assert 0.0 <= probabilities.min() and probabilities.max() <= 0.8 + 1e-6
    # MONAI's own inversion of the (only invertible) resize gives the original size too
    out["pred"] = out["label"].clone()
    inverted = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=True)(out)["pred"]
    assert inverted.shape == (1, HEIGHT, WIDTH)
    # nearest inversion of an enlarged mask is coarser than restore_original_size (exact above): measured Dice 0.92
    inverted_mask, reference = inverted[0].numpy() > 0.5, _object()
    assert 2.0 * (inverted_mask & reference).sum() / (inverted_mask.sum() + reference.sum()) > 0.9
    with pytest.raises(ValueError, match="spatial_shape"):
        restore_original_size(out["label"], {})


def _paired_sample(tmp_path: Path) -> dict[str, str]:
    """Image whose red channel is the mask (object red on black) to check image/label move together."""
    obj = _object()
    rgb = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    rgb[obj, 0] = 255
    Image.fromarray(rgb).save(tmp_path / "paired.png")
    Image.fromarray(obj.astype(np.uint8) * 255).save(tmp_path / "paired_mask.png")
    return {"image": str(tmp_path / "paired.png"), "label": str(tmp_path / "paired_mask.png")}


def test_augmentation_is_reproducible_and_keeps_pairs_aligned(tmp_path: Path) -> None:
    sample = _paired_sample(tmp_path)
    chain = get_seg_transforms(32, train=True, aug_prob=1.0)
    outputs = []
    for seed in (5, 5, 6):
        chain.set_random_state(seed)
        outputs.append(chain(dict(sample)))
    assert torch.equal(outputs[0]["image"], outputs[1]["image"])
    assert torch.equal(outputs[0]["label"], outputs[1]["label"])
    assert not torch.equal(outputs[0]["image"], outputs[2]["image"])
    plain = get_seg_transforms(32, train=False)(dict(sample))
    for out in outputs:
        image, label = out["image"], out["label"]
        assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() <= 1.0
        assert set(label.unique().tolist()) <= {0.0, 1.0}
        assert not torch.equal(label, plain["label"])  # prob 1: flipped and rotated
        # the red channel still marks the labelled pixels (same flips/rotation on both keys)
        red = image[0] > image[1] + 0.3
        overlap = 2.0 * (red & (label[0] > 0)).sum() / (red.sum() + (label[0] > 0).sum())
        assert overlap > 0.9


def test_eval_and_no_augment_chains_are_deterministic(tmp_path: Path) -> None:
    sample = _paired_sample(tmp_path)
    for chain in (get_seg_transforms(32, train=False), get_seg_transforms(32, train=True, augment=False)):
        first, second = chain(dict(sample)), chain(dict(sample))
        assert torch.equal(first["image"], second["image"]) and torch.equal(first["label"], second["label"])


def test_chains_pickle_for_worker_processes(tmp_path: Path) -> None:
    """DataLoader workers (spawn) and bundle parsing need picklable chains; the copy behaves the same."""
    sample = _paired_sample(tmp_path)
    chain = get_seg_transforms(32, train=True, aug_prob=1.0)
    clone = pickle.loads(pickle.dumps(chain))
    chain.set_random_state(3)
    clone.set_random_state(3)
    assert torch.equal(chain(dict(sample))["image"], clone(dict(sample))["image"])


def test_chains_batch_the_demo_set(demo_manifest: Path) -> None:
    labeled = Dataset(load_split(demo_manifest, "training")[:4], transform=get_seg_transforms(32, train=True))
    batch = next(iter(DataLoader(labeled, batch_size=4, num_workers=0)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].shape == (4, 1, 32, 32)
    assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.float32
    assert set(batch["label"].unique().tolist()) <= {0.0, 1.0}
    items = decollate_batch(batch)
    assert Path(items[0]["image"].meta["filename_or_obj"]).name == "demo_000.png"
    assert original_spatial_shape(items[0]["image"]) == (64, 64)
    unlabeled = Dataset(load_split(demo_manifest, "unlabeled")[:2], transform=get_unlabeled_transforms(32, train=True))
    sample = unlabeled[0]
    assert set(sample) == {"image"} and sample["image"].shape == (3, 32, 32)


@pytest.mark.realdata
@pytest.mark.parametrize("dataset, pattern", [("kvasir-seg", "*.jpg"), ("cvc-clinicdb", "*.png")])
def test_real_pair_loads_and_restores(real_data_root: Path, dataset: str, pattern: str) -> None:
    images = sorted((real_data_root / dataset / "images").glob(pattern))[:1]
    if not images:
        pytest.skip(f"{dataset} images absent")
    mask = real_data_root / dataset / "masks" / f"{images[0].stem}.png"
    out = get_seg_transforms(64, train=False)({"image": str(images[0]), "label": str(mask)})
    width, height = Image.open(images[0]).size
    assert original_spatial_shape(out["image"]) == (height, width)
    assert out["image"].shape == (3, 64, 64) and set(out["label"].unique().tolist()) == {0.0, 1.0}
    reference = np.asarray(Image.open(mask).convert("L")) > 127
    restored = restore_original_size(out["label"], out["image"])[0].numpy() > 0
    dice = 2.0 * (restored & reference).sum() / (restored.sum() + reference.sum())
    assert dice > 0.9
