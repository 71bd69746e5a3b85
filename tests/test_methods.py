"""SSL method strategies: formulas on hand-built tensors plus one tiny training run per method."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from monai.networks.nets import BasicUNet, UNet
from torch import nn

from qgssl_monai.engines import SemiSupervisedTrainer, ssl_optimizer_parameters
from qgssl_monai.handlers.ema import EMATeacherHandler
from qgssl_monai.losses import PerSampleDiceBCELoss
from qgssl_monai.methods import (
    CompositeMethod,
    CrossPseudoSupervision,
    InterpolationConsistency,
    PseudoLabelConfidence,
    PseudoLabelThreshold,
    QualityAwareRegularization,
    QualityWeighting,
    StepContext,
    UncertaintyAwareMeanTeacher,
    available_methods,
    build_method,
)
from qgssl_monai.methods.contrastive import pixel_info_nce
from qgssl_monai.methods.pseudo_label import random_box_mask, strong_augment
from ssl_test_doubles import TinyQuality


class MaskMeanQuality(nn.Module):
    """q = mean of the mask channel (last input channel): lets tests see which mask was scored."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return (self.scale * x[:, -1:]).flatten(1).mean(dim=1, keepdim=True)


class FixedQuality(nn.Module):
    """Returns preset qualities (B, 1)."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.register_buffer("values", torch.tensor(values).reshape(-1, 1))
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.values[: x.shape[0]] + 0.0 * self.weight


class RecordingLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []
        self.inner = PerSampleDiceBCELoss()

    def forward(self, logits, target, mask=None):
        self.calls.append((logits.detach().clone(), target.detach().clone(), None if mask is None else mask.clone()))
        return self.inner(logits, target, mask)


def make_context(student: nn.Module, image_u: torch.Tensor, loss=None, iteration: int = 1) -> StepContext:
    image_l = torch.rand(2, image_u.shape[1], *image_u.shape[2:])
    state = SimpleNamespace(iteration=iteration, max_epochs=2, epoch_length=5, epoch=1, unsup_weight=1.0)
    return StepContext(
        engine=SimpleNamespace(state=state),
        student=student,
        image_l=image_l,
        label_l=(image_l[:, :1] > 0.5).float(),
        logits_l=student(image_l),
        image_u=image_u,
        sup_loss_fn=PerSampleDiceBCELoss() if loss is None else loss,
    )


# ----------------------------------------------------------------------------------------------- quality weighting


def test_quality_weighting_plain_equals_q_and_thresholded_zeroes_below_tau() -> None:
    image = torch.rand(3, 3, 8, 8)
    pseudo = torch.ones(3, 1, 8, 8)
    losses = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    plain = QualityWeighting(FixedQuality([0.9, 0.4, 0.6]), mode="plain")
    loss, weights = plain(losses, image, pseudo)
    assert weights.tolist() == pytest.approx([0.9, 0.4, 0.6])
    assert not weights.requires_grad
    assert loss.item() == pytest.approx((0.9 * 1 + 0.4 * 2 + 0.6 * 3) / 3)

    released = QualityWeighting(FixedQuality([0.9, 0.4, 0.6]), mode="thresholded", power=2.0, threshold=0.5)
    loss, weights = released(losses, image, pseudo)
    assert weights.tolist() == pytest.approx([0.81, 0.0, 0.36])
    assert loss.item() == pytest.approx((0.81 * 1 + 0.36 * 3) / (0.81 + 0.36))
    loss.backward()  # gradient only through the loss, weights are constants
    assert losses.grad.tolist() == pytest.approx([0.81 / 1.17, 0.0, 0.36 / 1.17])

    unnormalised = QualityWeighting(FixedQuality([0.9, 0.4, 0.6]), mode="thresholded", normalize=False)
    assert unnormalised(losses, image, pseudo)[0].item() == pytest.approx((0.81 + 1.08) / 3)
    all_low = QualityWeighting(FixedQuality([0.1, 0.2, 0.3]), mode="thresholded")
    zero_loss, zero_weights = all_low(losses, image, pseudo)
    assert zero_loss.item() == 0.0 and zero_weights.sum().item() == 0.0


def test_quality_weighting_scores_image_and_pseudo_label_with_frozen_eval_g() -> None:
    g = MaskMeanQuality()
    g.train()
    qw = QualityWeighting(g)
    qw.train()
    assert not g.training and not g.scale.requires_grad
    image = torch.rand(2, 3, 4, 4)
    pseudo = torch.zeros(2, 1, 4, 4)
    pseudo[0, 0, :2] = 1.0
    assert qw.weights(image, pseudo).tolist() == pytest.approx([0.5, 0.0])
    assert torch.equal(g.inputs[-1], torch.cat([image, pseudo], dim=1))
    with pytest.raises(ValueError, match="mode"):
        QualityWeighting(g, mode="soft")


# ----------------------------------------------------------------------------------------------------------- QAR


def test_qar_gradients_reach_student_through_frozen_quality_net() -> None:
    torch.manual_seed(0)
    student = nn.Conv2d(3, 1, 3, padding=1)
    g = TinyQuality()
    g_before = [p.clone() for p in g.parameters()]
    method = QualityAwareRegularization(g)
    method.train()
    assert not g.training and all(not p.requires_grad for p in g.parameters())
    assert list(method.trainable_parameters()) == []
    image_u = torch.rand(2, 3, 8, 8)
    out = method.unsupervised_loss(make_context(student, image_u))
    expected = 1.0 - g(torch.cat([image_u, torch.sigmoid(student(image_u))], 1)).mean()
    assert out.unsup_loss.item() == pytest.approx(expected.item(), abs=1e-6)
    out.unsup_loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in g.parameters())
    # a full engine step with QAR never changes g
    trainer = _run(build_method("qar", quality_net=g), iterations=2)
    assert all(torch.equal(a, b) for a, b in zip(g_before, g.parameters()))
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not ({id(p) for p in g.parameters()} & optimized)


# ------------------------------------------------------------------------------------------------------- PL family


def test_pl_t_masks_unconfident_pixels_and_uses_student_hard_labels() -> None:
    logits = torch.tensor([[[[3.0, -3.0], [0.5, -1.0]]]])  # confidences .953 .953 .622 .731
    student = FixedLogits(logits)
    loss = RecordingLoss()
    method = PseudoLabelThreshold()  # threshold 0.9, student source
    method.setup(student)
    out = method.unsupervised_loss(make_context(student, torch.rand(1, 3, 2, 2), loss))
    _, target, mask = loss.calls[-1]
    assert target.flatten().tolist() == [1.0, 0.0, 1.0, 0.0]
    assert mask.flatten().tolist() == [1.0, 1.0, 0.0, 0.0]
    expected = PerSampleDiceBCELoss()(logits, target, mask)
    assert out.unsup_loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert out.logs["confident_pixel_fraction"].item() == 0.5


class FixedLogits(nn.Module):
    """Returns fixed logits (times a trainable scale, so gradients exist), for any input of matching batch."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)
        self.scale = nn.Parameter(torch.ones(()))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        reps = x.shape[0] // self.logits.shape[0]
        return self.scale * self.logits.repeat((reps,) + (1,) * (self.logits.ndim - 1))


def test_pl_c_weights_samples_by_mean_confidence_of_weak_view() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([[[[3.0, -3.0], [0.0, 1.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    student = FixedLogits(logits)
    loss = RecordingLoss()
    method = PseudoLabelConfidence()
    image_u = torch.rand(2, 3, 2, 2)
    out = method.unsupervised_loss(make_context(student, image_u, loss))
    joint = student.inputs[-1]
    assert torch.equal(joint[:2], image_u) and joint.shape[0] == 4  # weak + strong in one forward
    assert joint[2:].min() >= 0 and joint[2:].max() <= 1
    probs = torch.sigmoid(logits)
    confidence = torch.maximum(probs, 1 - probs).flatten(1).mean(1)
    per_sample = PerSampleDiceBCELoss()(logits, (probs > 0.5).float())
    assert out.unsup_loss.item() == pytest.approx((confidence * per_sample).mean().item(), abs=1e-6)
    assert confidence[1].item() == pytest.approx(0.5)


def test_strong_augment_range_and_cutout_box_size() -> None:
    torch.manual_seed(0)
    box = random_box_mask((3, 1, 16, 8), 0.25, torch.device("cpu"))
    assert box.shape == (3, 1, 16, 8)
    assert box.flatten(1).sum(1).tolist() == [8.0, 8.0, 8.0]  # 4 x 2 pixels per sample
    box3d = random_box_mask((2, 1, 8, 8, 8), 0.5, torch.device("cpu"))
    assert box3d.flatten(1).sum(1).tolist() == [64.0, 64.0]
    out = strong_augment(torch.rand(2, 3, 16, 16))
    assert out.min() >= 0 and out.max() <= 1 and (out == 0).any()


def test_pl_qw_uses_teacher_hard_labels_and_detached_quality_weights() -> None:
    torch.manual_seed(0)
    student = nn.Conv2d(3, 1, 1)
    g = MaskMeanQuality()
    method = build_method("pl-qw", quality_net=g)
    assert method.default_unsup_weight == 0.25 and method.source == "teacher"
    method.setup(student)
    with torch.no_grad():
        method.teacher.bias.fill_(-100.0)  # teacher predicts background everywhere
    image_u = torch.rand(2, 3, 4, 4)
    out = method.unsupervised_loss(make_context(student, image_u))
    assert torch.equal(g.inputs[-1][:, -1:], torch.zeros(2, 1, 4, 4))
    assert out.quality_weights.tolist() == [0.0, 0.0] and not out.quality_weights.requires_grad
    assert out.unsup_loss.item() == 0.0


# ------------------------------------------------------------------------------------------------ MT, UA-MT, ICT


def test_ua_mt_threshold_ramp_and_mask_excludes_high_entropy_pixels() -> None:
    method = UncertaintyAwareMeanTeacher(noise_std=0.0, mc_dropout=False, num_passes=3)
    assert method.entropy_threshold(0.0) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))
    assert method.entropy_threshold(1.0) == pytest.approx(math.log(2))
    assert method.entropy_threshold(0.5) == pytest.approx((0.75 + 0.25 * math.exp(-1.25)) * math.log(2))
    teacher_logits = torch.tensor([[[[5.0, 0.0], [-5.0, 0.2]]]])
    student_logits = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]]])
    student = FixedLogits(student_logits)
    method.setup(student)
    method.teacher.logits.copy_(teacher_logits)
    uncertainty = method.teacher_uncertainty(torch.rand(1, 3, 2, 2))
    assert uncertainty[0, 0, 0, 1].item() == pytest.approx(math.log(2), abs=1e-5)
    out = method.unsupervised_loss(make_context(student, torch.rand(1, 3, 2, 2)))
    # progress 0: threshold ~0.752 ln2; logits 0 and 0.2 have entropy > threshold and are excluded
    kept = torch.tensor([1.0, 0.0, 1.0, 0.0])
    diff = (torch.sigmoid(student_logits) - torch.sigmoid(teacher_logits)).flatten() ** 2
    assert out.unsup_loss.item() == pytest.approx((diff * kept).sum().item() / 2, abs=1e-6)
    assert out.logs["certain_pixel_fraction"].item() == 0.5


def test_ict_mixes_inputs_and_teacher_targets_with_fixed_beta_draw() -> None:
    torch.manual_seed(0)
    student = nn.Conv2d(1, 1, 1)
    method = InterpolationConsistency()
    method.setup(student)
    with torch.no_grad():
        method.teacher.weight.fill_(2.0)
        method.teacher.bias.fill_(-1.0)
    method.draw_mix_coefficient = lambda: 0.3
    method.draw_permutation = lambda n, device: torch.tensor([1, 0])
    recorder = FixedInputRecorder(student)
    image_u = torch.rand(2, 1, 3, 3)
    out = method.unsupervised_loss(make_context(recorder, image_u))
    mixed = 0.3 * image_u + 0.7 * image_u[[1, 0]]
    assert torch.allclose(recorder.inputs[-1], mixed)
    teacher_probs = torch.sigmoid(2.0 * image_u - 1.0)
    target = 0.3 * teacher_probs + 0.7 * teacher_probs[[1, 0]]
    expected = ((torch.sigmoid(student(mixed)) - target) ** 2).mean()
    assert out.unsup_loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert out.logs["mix_coefficient"] == 0.3
    assert 0.0 <= InterpolationConsistency().draw_mix_coefficient() <= 1.0


class FixedInputRecorder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.inner(x)


def test_ict_qw_weights_are_mixed_teacher_qualities() -> None:
    student = nn.Conv2d(1, 1, 1)
    method = InterpolationConsistency(quality_weighting=QualityWeighting(MaskMeanQuality()))
    method.setup(student)
    with torch.no_grad():
        method.teacher.weight.fill_(0.0)
        method.teacher.bias.copy_(torch.tensor([0.0]))
    method.draw_mix_coefficient = lambda: 0.25
    method.draw_permutation = lambda n, device: torch.tensor([1, 0])
    image_u = torch.rand(2, 1, 2, 2)
    with torch.no_grad():  # teacher logits = 10 * x - 5 on sample-dependent images: qualities differ
        method.teacher.weight.fill_(10.0)
        method.teacher.bias.fill_(-5.0)
    q = ((10 * image_u - 5) > 0).float().flatten(1).mean(1)
    out = method.unsupervised_loss(make_context(student, image_u))
    assert out.quality_weights.tolist() == pytest.approx((0.25 * q + 0.75 * q[[1, 0]]).tolist())


# ----------------------------------------------------------------------------------------------------- CPS, CL


def test_cps_each_network_learns_from_the_others_thresholded_prediction() -> None:
    torch.manual_seed(0)
    student = nn.Conv2d(3, 1, 3, padding=1)
    loss = RecordingLoss()
    method = CrossPseudoSupervision(loss_function=loss)
    method.setup(student)
    assert not torch.equal(method.peer.weight, student.weight)  # independently initialised
    assert {id(p) for p in method.trainable_parameters()} == {id(p) for p in method.peer.parameters()}
    image_u = torch.rand(2, 3, 6, 6)
    out = method.unsupervised_loss(make_context(student, image_u))
    (logits_a, target_a, _), (logits_b, target_b, _), (_, peer_sup_target, _) = loss.calls
    assert torch.equal(logits_a, student(image_u).detach())
    assert torch.equal(target_a, (method.peer(image_u) > 0).float())  # student's target: peer's hard label
    assert torch.equal(target_b, (student(image_u) > 0).float())  # peer's target: student's hard label
    assert peer_sup_target.shape == (2, 1, 6, 6)
    assert out.extra_sup_loss.requires_grad


def test_cps_qw_weights_each_pseudo_label_by_its_own_quality() -> None:
    torch.manual_seed(0)
    student = nn.Conv2d(3, 1, 1)
    method = build_method("cps-qw", quality_net=MaskMeanQuality())
    method.setup(student)
    with torch.no_grad():
        student.weight.zero_(), student.bias.fill_(5.0)  # student: all foreground
        method.peer.weight.zero_(), method.peer.bias.fill_(-5.0)  # peer: all background
    out = method.unsupervised_loss(make_context(student, torch.rand(2, 3, 4, 4)))
    # [w(peer label) for the student's loss, w(student label) for the peer's loss]
    assert out.quality_weights.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_pixel_info_nce_matches_hand_computation() -> None:
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])  # 4 pixels, unit vectors
    embeddings = e.T.reshape(1, 2, 2, 2)
    label = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 2, 2)
    confident = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    loss = pixel_info_nce(embeddings, label, confident, temperature=0.5, num_anchors=8, num_negatives=256)
    tau = 0.5
    expected = []
    for cls, members, others in ((1, [0, 1], [2, 3]), (0, [2, 3], [0, 1])):
        proto = e[members].sum(0)
        proto = proto / proto.norm()
        for a in members:
            pos = torch.exp(e[a] @ proto / tau)
            neg = sum(torch.exp(e[a] @ e[n] / tau) for n in others)
            expected.append(-torch.log(pos / (pos + neg)))
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-5)
    none_confident = pixel_info_nce(embeddings, label, torch.zeros_like(confident))
    assert none_confident.tolist() == [0.0]


def test_cl_adds_weighted_contrastive_term_and_trains_projection_head() -> None:
    torch.manual_seed(0)
    student = nn.Conv2d(3, 1, 3, padding=1)
    method = build_method("cl", confidence_threshold=None, contrastive_weight=0.5)
    out = method.unsupervised_loss(make_context(student, torch.rand(2, 3, 8, 8)))
    expected = out.logs["pseudo_label_loss"] + 0.5 * out.logs["contrastive_loss"]
    assert out.unsup_loss.item() == pytest.approx(expected.item(), abs=1e-5)
    out.unsup_loss.backward()
    assert all(p.grad is not None for p in method.trainable_parameters())


def test_cl_uses_penultimate_features_of_a_named_student_layer() -> None:
    torch.manual_seed(0)
    student = BasicUNet(2, 3, 1, features=(4, 4, 8, 8, 16, 4))
    seen = []
    student.final_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    method = build_method("cl", feature_layer="final_conv", feature_channels=4, confidence_threshold=None)
    method.setup(student)
    assert method.projection_head[0].in_channels == 4 + 3
    captured = []
    original_embed = method.embed

    def recording_embed(context: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        captured.append(context.detach())
        return original_embed(context, probs)

    method.embed = recording_embed
    image_u = torch.rand(2, 3, 32, 32)
    ctx = make_context(student, image_u)
    out = method.unsupervised_loss(ctx)
    assert torch.equal(captured[-1], seen[-1]) and captured[-1].shape == (2, 4, 32, 32)
    assert "student_logits_u" in ctx.cache  # shared with other components
    out.unsup_loss.backward()
    assert all(p.grad is not None for p in method.trainable_parameters())
    assert student.final_conv.weight.grad is not None
    with pytest.raises(ValueError, match="not a submodule"):
        build_method("cl", feature_layer="nope", feature_channels=4).setup(student)
    with pytest.raises(ValueError, match="feature_channels"):
        build_method("cl", feature_layer="final_conv")


# ----------------------------------------------------------------------------------------------- registry, composition


def test_registry_builds_every_name_and_reports_errors() -> None:
    names = available_methods()
    for expected in ("sup", "pl-t", "pl-c", "pl-qw", "mt", "ua-mt", "ict", "cl", "cps", "qar", "qar+qw", "mt-qw",
                     "ua-mt-qw", "ict-qw", "cl-qw", "cps-qw", "pl-t-qw", "pl-c-qw"):
        assert expected in names
    with pytest.raises(ValueError, match="unknown SSL method 'nope'"):
        build_method("nope")
    with pytest.raises(ValueError, match="quality_net"):
        build_method("mt-qw")
    method = build_method("mt-qw", quality_net=TinyQuality(), qw_mode="thresholded", qw_threshold=0.6)
    assert method.name == "mt-qw"
    assert method.quality_weighting.mode == "thresholded" and method.quality_weighting.threshold == 0.6


def test_qar_plus_qw_is_weighted_sum_of_components_sharing_one_student_forward() -> None:
    torch.manual_seed(0)
    g = TinyQuality()
    method = build_method("qar+qw", quality_net=g)
    assert isinstance(method, CompositeMethod) and method.default_unsup_weight == 1.0
    student = FixedInputRecorder(nn.Conv2d(3, 1, 1))
    method.setup(student)
    ctx = make_context(student, torch.rand(2, 3, 4, 4))
    n_before = len(student.inputs)
    out = method.unsupervised_loss(ctx)
    assert len(student.inputs) - n_before == 1  # QAR and PL-QW share ctx.student_logits_u()
    expected = 0.01 * out.logs["qar_unsup_loss"] + 0.25 * out.logs["pl_qw_unsup_loss"]
    assert out.unsup_loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert out.quality_weights.shape == (2,)


# ------------------------------------------------------------------------------------------- tiny training runs


def _run(method, iterations: int = 2, channels: int = 3):
    torch.manual_seed(0)
    network = UNet(2, channels, 1, channels=(4, 8), strides=(2,), num_res_units=0)
    optimizer = torch.optim.Adam(ssl_optimizer_parameters(network, method), lr=1e-2)
    images = torch.rand(2, channels, 32, 32)
    labeled = [{"image": images, "label": (images[:, :1] > 0.5).float()}]
    unlabeled = [{"image": torch.rand(2, channels, 32, 32)}]
    trainer = SemiSupervisedTrainer(
        "cpu", 1, labeled, network, optimizer, unlabeled_data_loader=unlabeled, method=method,
        epoch_length=iterations, unsup_weight=1.0, train_handlers=[EMATeacherHandler()],
    )
    trainer.before = [p.detach().clone() for p in network.parameters()]
    trainer.extra_before = [p.detach().clone() for p in method.trainable_parameters()]
    trainer.teacher_before = [p.detach().clone() for p in getattr(method, "teacher", None).parameters()] \
        if getattr(method, "teacher", None) is not None else []
    trainer.run()
    return trainer


TINY_RUN_METHODS = ["sup", "pl-t", "pl-c", "pl-qw", "mt", "ua-mt", "ict", "cl", "cps", "qar", "mt-qw", "ua-mt-qw",
                    "ict-qw", "cl-qw", "cps-qw", "pl-t-qw", "pl-c-qw", "qar+qw"]


@pytest.mark.parametrize("name", TINY_RUN_METHODS)
def test_every_method_trains_through_the_engine(name: str) -> None:
    kwargs = {"quality_net": TinyQuality()} if ("qw" in name or name == "qar") else {}
    method = build_method(name, **kwargs)
    trainer = _run(method)
    assert trainer.state.iteration == 2
    out = trainer.state.output[0]
    assert math.isfinite(out["loss"]) and math.isfinite(out["unsup_loss"])
    if name != "sup":
        assert out["unsup_loss"] != 0.0
    assert any(not torch.equal(a, b) for a, b in zip(trainer.before, trainer.network.parameters()))
    extra = list(method.trainable_parameters())
    if extra:
        assert any(not torch.equal(a, b) for a, b in zip(trainer.extra_before, extra))
    if trainer.teacher_before:
        assert any(not torch.equal(a, b) for a, b in zip(trainer.teacher_before, method.teacher.parameters()))
    if name.endswith("qw"):
        assert trainer.state.quality_weights is not None and not trainer.state.quality_weights.requires_grad
