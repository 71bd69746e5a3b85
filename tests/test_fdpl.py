"""FDPL / FDPL-QW: crop geometry, COM, CutMix, cross supervision, quality weights, engine runs 2D and 3D."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from qgssl_monai.losses import PerSampleDiceBCELoss
from qgssl_monai.methods.base import StepContext
from qgssl_monai.methods.base import reinitialise
from qgssl_monai.methods.fdpl import FDPL, FDPLQW
from qgssl_monai.methods.fdpl_ops import (
    SegmentationCutMix,
    combine_pseudo_labels,
    crop_batch,
    default_crop_size,
    overlap_slices,
    sample_crop_starts,
    shifted_crop_starts,
    temporary_pseudo_label,
)
from qgssl_monai.methods.quality_weighting import QualityWeighting


# --------------------------------------------------------------------------------------------- helpers
class ConstantLogit(nn.Module):
    """Outputs the same logit everywhere (a trainable bias), whatever the input: ``(B, 1, *S)``."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :1] * 0.0 + self.bias


class RecordingLoss:
    """Per-sample BCE that remembers every (logits, target) pair it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[Tensor, Tensor]] = []

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        self.calls.append((logits.detach().clone(), target.detach().clone()))
        return nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)


def _context(student: nn.Module, image_u: Tensor, loss_fn=None, image_l: Tensor | None = None) -> StepContext:
    image_l = image_u[:1] if image_l is None else image_l
    loss_fn = loss_fn or RecordingLoss()
    return StepContext(
        engine=SimpleNamespace(state=SimpleNamespace(epoch=1, iteration=1)),
        student=student,
        image_l=image_l,
        label_l=(image_l[:, :1] > 0.5).float(),
        logits_l=student(image_l),
        image_u=image_u,
        sup_loss_fn=loss_fn,
    )


# --------------------------------------------------------------------------------------------- geometry
def test_default_crop_size_rounds_down_to_network_multiple() -> None:
    assert default_crop_size((256, 256)) == (192, 192)
    assert default_crop_size((352, 288)) == (256, 192)  # 264 -> 256, 216 -> 192
    assert default_crop_size((64, 64, 40), multiple=16) == (48, 48, 16)
    with pytest.raises(ValueError, match="set `crop_size`"):
        default_crop_size((32, 32))


def test_sampled_crops_stay_inside_and_crop_batch_cuts_there() -> None:
    starts = sample_crop_starts((10, 12), (4, 5), 200, np.random.RandomState(0))
    assert starts.shape == (200, 2) and starts.min() == 0
    assert starts[:, 0].max() == 6 and starts[:, 1].max() == 7
    image = torch.arange(2 * 10 * 12, dtype=torch.float32).reshape(2, 1, 10, 12)
    crops = crop_batch(image, np.array([[1, 2], [6, 7]]), (4, 5))
    assert torch.equal(crops[0, 0], image[0, 0, 1:5, 2:7]) and torch.equal(crops[1, 0], image[1, 0, 6:10, 7:12])


def test_shifted_crops_land_at_offsets_and_clamp_at_borders() -> None:
    # image 16x16, crop 8x8, offset 3; sample 0 in the middle, sample 1 at the top-left corner,
    # sample 2 two pixels from the bottom-right limit (limit = 8)
    fixed = np.array([[4, 4], [0, 0], [6, 7]])
    starts, valid = shifted_crop_starts(fixed, (8, 8), (16, 16), offset=3)
    assert starts.shape == (3, 4, 2)
    # order: +axis0, -axis0, +axis1, -axis1
    assert starts[0].tolist() == [[7, 4], [1, 4], [4, 7], [4, 1]]
    assert valid[0].tolist() == [True, True, True, True]
    # at the top-left corner the negative shifts are clamped to 0: they repeat the fixed crop -> invalid
    assert starts[1].tolist() == [[3, 0], [0, 0], [0, 3], [0, 0]]
    assert valid[1].tolist() == [True, False, True, False]
    # near the bottom-right limit the positive shifts are reduced (to 2 and 1 pixels)
    assert starts[2].tolist() == [[8, 7], [3, 7], [6, 8], [6, 4]]
    assert valid[2].tolist() == [True, True, True, True]
    # 3D: only the in-plane axes (0, 1) move, axis 2 keeps its start
    starts3, _ = shifted_crop_starts(np.array([[2, 2, 5]]), (4, 4, 4), (8, 8, 12), offset=(1, 2))
    assert starts3[0].tolist() == [[3, 2, 5], [1, 2, 5], [2, 4, 5], [2, 0, 5]]


def test_overlap_slices_in_both_frames() -> None:
    in_fixed, in_shifted = overlap_slices((4, 4), (7, 4), (8, 8))
    assert in_fixed == (slice(3, 8), slice(0, 8)) and in_shifted == (slice(0, 5), slice(0, 8))
    in_fixed, in_shifted = overlap_slices((4, 4), (4, 2), (8, 8))
    assert in_fixed == (slice(0, 8), slice(0, 6)) and in_shifted == (slice(0, 8), slice(2, 8))
    assert overlap_slices((0, 0), (8, 0), (8, 8)) is None


def test_temporary_pseudo_label_averages_overlaps_and_com_fills_the_rest() -> None:
    crop = (4, 4)
    fixed_starts = np.array([[0, 0]])
    # two valid shifted crops: +1 along axis 0 (value 1.0) and +2 along axis 1 (value 0.5); one invalid (9.0)
    shifted_starts = np.array([[[1, 0], [0, 2], [0, 0]]])
    valid = np.array([[True, True, False]])
    maps = torch.stack([torch.full((1, 4, 4), 1.0), torch.full((1, 4, 4), 0.5), torch.full((1, 4, 4), 9.0)])[None]
    temporary, coverage = temporary_pseudo_label(maps, fixed_starts, shifted_starts, valid, crop)
    expected_coverage = torch.tensor(
        [[0, 0, 1, 1], [1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 2, 2]], dtype=torch.float32
    )
    assert torch.equal(coverage[0, 0], expected_coverage)
    expected_temporary = torch.tensor(
        [[0, 0, 0.5, 0.5], [1, 1, 0.75, 0.75], [1, 1, 0.75, 0.75], [1, 1, 0.75, 0.75]]
    )
    assert torch.allclose(temporary[0, 0], expected_temporary)
    fixed = torch.full((1, 1, 4, 4), 0.2)
    dynamic = combine_pseudo_labels(fixed, temporary, coverage)
    # COM: overlap from the temporary pseudo-label, the uncovered corner from the fixed one
    expected = expected_temporary.clone()
    expected[0, :2] = 0.2
    assert torch.allclose(dynamic[0, 0], expected)


def test_temporary_pseudo_label_maps_content_back_to_fixed_coordinates() -> None:
    # a per-pixel "prediction" equal to the image: mapping shifted crops back must reproduce the fixed crop
    image = torch.rand(1, 1, 12, 12)
    fixed_starts = np.array([[3, 2]])
    shifted_starts, valid = shifted_crop_starts(fixed_starts, (6, 6), (12, 12), offset=2)
    shifted = torch.stack([crop_batch(image, shifted_starts[:, k], (6, 6)) for k in range(4)], dim=1)
    temporary, coverage = temporary_pseudo_label(shifted, fixed_starts, shifted_starts, valid, (6, 6))
    assert bool((coverage > 0).all())
    assert torch.allclose(temporary, crop_batch(image, fixed_starts, (6, 6)))


def test_cutmix_same_box_for_images_and_labels() -> None:
    mixer = SegmentationCutMix(batch_size=3, alpha=1.0)
    mixer.set_random_state(5)
    images = torch.rand(3, 3, 16, 16)
    labels = (torch.rand(3, 1, 16, 16) > 0.5).float()
    mixer.randomize(images)
    box = mixer.box_mask(images.shape)
    _, permutation, _ = mixer._params
    mixed_images, mixed_labels = mixer.apply(images), mixer.apply(labels)
    for s in range(3):
        inside = box[s, 0].bool()
        assert torch.equal(mixed_images[s][:, inside], images[permutation[s]][:, inside])
        assert torch.equal(mixed_images[s][:, ~inside], images[s][:, ~inside])
        assert torch.equal(mixed_labels[s][:, inside], labels[permutation[s]][:, inside])
        assert torch.equal(mixed_labels[s][:, ~inside], labels[s][:, ~inside])
    # a box is a rectangle: its pixel count equals the product of its extents
    rows, cols = box[0, 0].any(1).sum(), box[0, 0].any(0).sum()
    assert box[0, 0].sum() == rows * cols > 0


# --------------------------------------------------------------------------------------------- method
def test_peer_is_independently_initialised_and_trainable() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1))
    method = FDPL(peer_seed=3)
    method.setup(student)
    method.setup(student)  # idempotent
    assert method.peer is not student
    assert not torch.equal(method.peer[0].weight, student[0].weight)
    again = reinitialise(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1)), 3)
    assert torch.equal(again[0].weight, method.peer[0].weight)  # seeded
    assert {id(p) for p in method.trainable_parameters()} == {id(p) for p in method.peer.parameters()}


def test_each_subnet_learns_from_the_others_pseudo_labels() -> None:
    student, peer = ConstantLogit(4.0), ConstantLogit(-4.0)  # A predicts foreground, B background
    loss = RecordingLoss()
    method = FDPL(peer, crop_size=8, beta=0.5, seed=0)
    output = method.unsupervised_loss(_context(student, torch.rand(2, 3, 16, 16), loss))
    # calls: L_fix(A), L_dyn(A), L_fix(B), L_dyn(B) on 8x8 crops, then B's supervised loss on the 16x16 image
    assert len(loss.calls) == 5
    for logits, target in loss.calls[:2]:  # A's predictions against B's (all background) labels
        assert logits.shape == (2, 1, 8, 8) and torch.all(logits == 4.0) and torch.all(target == 0.0)
    for logits, target in loss.calls[2:4]:  # B's predictions against A's (all foreground) labels
        assert logits.shape == (2, 1, 8, 8) and torch.all(logits == -4.0) and torch.all(target == 1.0)
    assert loss.calls[4][0].shape == (1, 1, 16, 16) and torch.all(loss.calls[4][0] == -4.0)
    bce = nn.functional.softplus(torch.tensor(4.0))  # BCE of logit 4 vs 0 = BCE of -4 vs 1
    assert torch.allclose(output.unsup_loss, 2 * bce * (1 + 0.5))
    output.unsup_loss.backward()
    assert student.bias.grad > 0 and peer.bias.grad < 0  # each pushed toward the other's label
    assert output.quality_weights is None


def test_b_trains_on_cutmix_crops_with_identically_mixed_targets() -> None:
    # A is a per-pixel threshold (prediction = image > 0.5), so A's fixed and dynamic pseudo-labels equal the
    # thresholded crop; after CutMix B's target must equal its mixed input thresholded, pixel for pixel.
    student = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        student.weight.fill_(20.0)
        student.bias.fill_(-10.0)
    seen: list[Tensor] = []
    peer = ConstantLogit(0.0)
    peer.register_forward_hook(lambda module, inputs, out: seen.append(inputs[0].detach().clone()))
    loss = RecordingLoss()
    method = FDPL(peer, crop_size=8, seed=1)
    image_u = torch.rand(4, 1, 16, 16)
    method.unsupervised_loss(_context(student, image_u, loss))
    mixed = seen[-2]  # B's forward on the CutMix crops (the last one is its labeled forward)
    assert mixed.shape == (4, 1, 8, 8)
    for _, target in loss.calls[2:4]:
        assert torch.equal(target, (mixed > 0.5).float())
    # mixing happened: some crop holds pixels of another sample (not a crop of its own image)
    own_crops = [
        any(torch.equal(mixed[s], image_u[s, :, i : i + 8, j : j + 8]) for i in range(9) for j in range(9))
        for s in range(4)
    ]
    assert not all(own_crops)


class MeanMaskQuality(nn.Module):
    """Fake quality predictor: the mean of the mask channel (the last input channel), ``(B, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return (x[:, -1:].flatten(1).mean(1, keepdim=True) * self.scale).clamp(0, 1)


def test_fdpl_qw_weights_come_from_quality_weighting_and_are_detached(monkeypatch: pytest.MonkeyPatch) -> None:
    student, peer = ConstantLogit(4.0), ConstantLogit(-4.0)
    weighting = QualityWeighting(MeanMaskQuality())
    calls: list[tuple[int, int]] = []
    original = QualityWeighting.forward

    def spy(self, per_sample_loss, image, pseudo_label):
        calls.append((image.shape[1], pseudo_label.shape[-1]))
        return original(self, per_sample_loss, image, pseudo_label)

    method = FDPLQW(peer, quality_weighting=weighting, crop_size=8, beta=2.0)
    monkeypatch.setattr(QualityWeighting, "forward", spy)
    output = method.unsupervised_loss(_context(student, torch.rand(3, 3, 16, 16)))
    # four pseudo-label sets scored on the 3-channel crops of side 8
    assert calls == [(3, 8)] * 4
    weights = output.quality_weights
    assert weights.shape == (12,) and not weights.requires_grad
    # A's targets (B's labels) are all background -> quality 0; B's targets (A's labels) all foreground -> 1
    assert torch.equal(weights, torch.tensor([0.0] * 6 + [1.0] * 6))
    bce = nn.functional.softplus(torch.tensor(4.0))
    assert torch.allclose(output.unsup_loss, bce * (1 + 2.0))  # only B's direction counts
    output.unsup_loss.backward()
    assert weighting.quality_net.scale.grad is None
    assert student.bias.grad == 0 and peer.bias.grad < 0
    with pytest.raises(TypeError, match="QualityWeighting"):
        FDPLQW(quality_weighting=MeanMaskQuality())


# --------------------------------------------------------------------------------------------- engine runs
def _blob_images(n: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` RGB images with one bright disc each and their masks, ``(n, 3, size, size)`` / ``(n, 1, size, size)``."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).float()
    centres = torch.rand(n, 2, 1, 1, generator=gen) * size * 0.5 + size * 0.25
    masks = (((grid - centres) ** 2).sum(1, keepdim=True) < (size / 6) ** 2).float()
    images = (0.3 + 0.5 * masks + 0.1 * torch.rand(n, 3, size, size, generator=gen)).clamp(0, 1)
    return images, masks


def _snapshot(module: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(before: list[Tensor], module: nn.Module) -> bool:
    return all(not torch.equal(b, p) for b, p in zip(before, module.parameters()))


def test_tiny_2d_fdpl_qw_run_through_engine_updates_both_subnets() -> None:
    from monai.networks.nets import UNet
    from torch.utils.data import DataLoader

    from qgssl_monai.engines.ssl_trainer import SemiSupervisedTrainer, ssl_optimizer_parameters
    from qgssl_monai.methods import build_method

    torch.manual_seed(0)
    images, masks = _blob_images(4, 64, seed=0)
    unlabeled, _ = _blob_images(4, 64, seed=1)
    student = UNet(2, 3, 1, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
    quality = nn.Sequential(nn.Conv2d(4, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 1), nn.Sigmoid())
    method = build_method("fdpl-qw", quality_net=quality, crop_multiple=16, seed=0)
    assert isinstance(method, FDPLQW) and method.name == "fdpl-qw"
    optimizer = torch.optim.Adam(ssl_optimizer_parameters(student, method), lr=1e-2)
    before_a, before_b, before_g = _snapshot(student), _snapshot(method.peer), _snapshot(quality)
    trainer = SemiSupervisedTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=2,
        train_data_loader=DataLoader([{"image": i, "label": m} for i, m in zip(images, masks)], batch_size=2),
        unlabeled_data_loader=DataLoader([{"image": i} for i in unlabeled], batch_size=2),
        network=student,
        optimizer=optimizer,
        method=method,
        decollate=False,
    )
    trainer.run()
    output = trainer.state.output
    assert trainer.state.iteration == 2 and trainer.state.unsup_weight == pytest.approx(0.1)
    assert all(np.isfinite(output[k]) for k in ("loss", "sup_loss", "unsup_loss", "extra_sup_loss"))
    assert output["extra_sup_loss"] > 0 and "fdpl_loss_dyn" in output
    weights = trainer.state.quality_weights
    assert weights.shape == (8,) and not weights.requires_grad and 0.0 <= float(weights.min()) <= 1.0
    assert output["quality_weight_mean"] == pytest.approx(float(weights.mean()), abs=1e-6)
    assert _changed(before_a, student) and _changed(before_b, method.peer)
    assert all(torch.equal(b, p) for b, p in zip(before_g, quality.parameters()))  # g stays frozen


def test_tiny_3d_fdpl_run_patches_and_sliding_window(tmp_path) -> None:
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator
    from monai.handlers import MeanDice, from_engine
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import UNet
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        RandCropByPosNegLabeld,
        RandSpatialCropd,
    )

    from qgssl_monai.data.manifest import load_split
    from qgssl_monai.data.synthetic3d import generate_synthetic_3d
    from qgssl_monai.engines.ssl_trainer import SemiSupervisedTrainer, ssl_optimizer_parameters
    from qgssl_monai.metrics import compute_binary_metrics

    manifest = generate_synthetic_3d(tmp_path, n_labeled=2, n_unlabeled=2, n_validation=1, n_test=0, seed=0)
    keys = ("image", "label")
    load = [LoadImaged(keys=keys), EnsureChannelFirstd(keys=keys), AsDiscreted(keys="label", threshold=0.5)]
    patches = RandCropByPosNegLabeld(
        keys=keys, label_key="label", spatial_size=(24, 24, 24), pos=1, neg=1, num_samples=1
    )
    labeled = Dataset(load_split(manifest, "training"), Compose([*load, patches]))
    unlabeled_chain = Compose(
        [
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            RandSpatialCropd(keys="image", roi_size=(24, 24, 24), random_size=False),
        ]
    )
    unlabeled = Dataset(load_split(manifest, "unlabeled"), unlabeled_chain)
    for chain in (labeled.transform, unlabeled_chain):
        chain.set_random_state(0)

    torch.manual_seed(0)
    student = UNet(3, 1, 1, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
    method = FDPL(crop_multiple=8, seed=0)  # 3/4 of 24 -> 16^3 crops, offset 4 in-plane
    optimizer = torch.optim.Adam(ssl_optimizer_parameters(student, method), lr=1e-2)
    before_a, before_b = _snapshot(student), _snapshot(method.peer)
    trainer = SemiSupervisedTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=2,
        train_data_loader=DataLoader(labeled, batch_size=2),
        unlabeled_data_loader=DataLoader(unlabeled, batch_size=2),
        network=student,
        optimizer=optimizer,
        method=method,
        decollate=False,
    )
    trainer.run()
    output = trainer.state.output
    assert output["image"].shape == (2, 1, 24, 24, 24)
    assert np.isfinite(output["unsup_loss"]) and output["fdpl_samples_with_dynamic_crops"] == 1.0
    assert _changed(before_a, student) and _changed(before_b, method.peer)

    evaluator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=DataLoader(Dataset(load_split(manifest, "validation"), Compose(load)), batch_size=1),
        network=student,
        inferer=SlidingWindowInferer(roi_size=(24, 24, 24), sw_batch_size=2, overlap=0.25),
        postprocessing=Compose([Activationsd(keys="pred", sigmoid=True), AsDiscreted(keys="pred", threshold=0.5)]),
        key_val_metric={"val_mean_dice": MeanDice(output_transform=from_engine(["pred", "label"]))},
        decollate=False,
    )
    evaluator.run()
    assert 0.0 <= evaluator.state.metrics["val_mean_dice"] <= 1.0
    pred, label = evaluator.state.output["pred"], evaluator.state.output["label"]
    assert pred.shape == label.shape == (1, 1, 32, 32, 32)  # whole volume stitched from 24^3 windows
    metrics = compute_binary_metrics(pred, label)
    assert set(metrics) >= {"dice", "iou", "hd95", "asd"} and metrics["dice"].shape == (1,)
    assert float(metrics["dice"][0]) == pytest.approx(evaluator.state.metrics["val_mean_dice"], abs=1e-5)


def test_random_stream_is_saved_and_restored_with_the_method(tmp_path) -> None:
    student = nn.Conv2d(3, 1, 1)
    first = FDPL(crop_size=8, seed=0)
    first.setup(student)
    first.unsupervised_loss(_context(student, torch.rand(2, 3, 16, 16)))  # advances the stream
    torch.save(first.state_dict(), tmp_path / "method.pt")
    expected = first.R.randint(0, 1_000_000, size=5)
    resumed = FDPL(crop_size=8, seed=123)
    resumed.setup(student)
    resumed.load_state_dict(torch.load(tmp_path / "method.pt", weights_only=True))
    assert resumed.R.randint(0, 1_000_000, size=5).tolist() == expected.tolist()
    assert all(torch.equal(a, b) for a, b in zip(resumed.peer.parameters(), first.peer.parameters()))
