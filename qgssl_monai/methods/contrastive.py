"""CL: pseudo-labels plus a local pixel-level contrastive loss (InfoNCE over sampled pixels).

Pixel embeddings come from a small projection head owned by the method,
``e = normalize(head(cat([h, p, avgpool_3(p), avgpool_7(p)])))`` with ``p = sigmoid(f(x))`` (stride-1 pooling,
full resolution) and ``h`` either

* the student's penultimate features, when reachable: ``feature_layer`` names the student submodule whose
  *input* they are (e.g. ``"final_conv"`` of MONAI ``BasicUNet``), captured by a forward pre-hook during the
  student's unlabeled forward and resized to the logits' size (``feature_channels`` channels); or
* the image ``x`` itself (default): the input-level multi-scale probability context, for networks that only
  expose logits.

Gradients reach the student through ``p`` (and ``h``). Head: 1x1 conv -> ReLU -> 1x1 conv (32 hidden, 16 output
channels).

Per iteration, with the pseudo-label ``y`` and confidence mask of :class:`PseudoLabel` (student source, pixel
confidence >= 0.9):

* prototypes ``c_k`` (k in {0, 1}) = normalised mean embedding of the confident class-k pixels of the batch (detached);
* anchors: up to ``num_anchors`` confident pixels of each class per sample (uniformly sampled);
* negatives: ``num_negatives`` (256) confident pixels of the other class, sampled from the whole batch (detached);
* ``l_a = -log( exp(e_a . c_k / tau) / (exp(e_a . c_k / tau) + sum_n exp(e_a . e_n / tau)) )``, ``tau`` 0.1;
* per-sample contrastive loss = mean of ``l_a`` over the sample's anchors (0 without anchors).

``unsup_loss = reduce_j(L_pl_j + lambda_c * L_con_j)`` with ``lambda_c`` 0.1; CL-QW weights both terms per sample
with ``g(x_j, y_j)``. Sampling is sync-free (top-k over random scores of valid pixels). Defaults: issue spec
(0.1, 0.1, 256); anchors per class per sample 32, embedding sizes: our choice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.networks.layers import Conv, Pool
from torch import Tensor, nn

from qgssl_monai.methods.base import MethodOutput, StepContext, unwrap_parallel
from qgssl_monai.methods.pseudo_label import PseudoLabel, hard_label
from qgssl_monai.methods.quality_weighting import QualityWeighting

__all__ = ["ContrastivePseudoLabel", "pixel_info_nce"]


def _sample_valid(valid: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Uniformly sample up to ``count`` positions per row of a ``(R, N)`` bool mask, without host sync.

    Returns ``(indices (R, k), chosen_valid (R, k))`` with ``k = min(count, N)``.
    """
    scores = torch.rand(valid.shape, device=valid.device).masked_fill(~valid, -1.0)
    top, indices = scores.topk(min(count, valid.shape[1]), dim=1)
    return indices, top >= 0


def pixel_info_nce(
    embeddings: Tensor,
    pseudo_label: Tensor,
    confident: Tensor,
    temperature: float = 0.1,
    num_anchors: int = 32,
    num_negatives: int = 256,
) -> Tensor:
    """Per-sample pixel InfoNCE (see module docstring).

    Args:
        embeddings: ``(B, D, *S)`` L2-normalised pixel embeddings.
        pseudo_label: ``(B, 1, *S)`` in ``{0, 1}``.
        confident: ``(B, 1, *S)`` bool/``{0, 1}`` pixels allowed as anchors, negatives and prototype members.

    Returns:
        ``(B,)`` contrastive loss (0 for samples without anchors).
    """
    batch, dim = embeddings.shape[:2]
    flat = embeddings.flatten(2).transpose(1, 2)  # (B, N, D)
    labels = pseudo_label.flatten(1) > 0.5  # (B, N)
    valid = confident.flatten(1) > 0
    total = flat.new_zeros(batch)
    count = flat.new_zeros(batch)
    for cls in (0, 1):
        members = valid & (labels == bool(cls))
        others = valid & (labels != bool(cls))
        weights = members.to(flat.dtype).unsqueeze(-1)
        prototype = F.normalize((flat.detach() * weights).sum(dim=(0, 1)), dim=0)  # (D,)
        anchor_idx, anchor_ok = _sample_valid(members, num_anchors)  # (B, A)
        anchors = flat.gather(1, anchor_idx.unsqueeze(-1).expand(-1, -1, dim))  # (B, A, D)
        neg_idx, neg_ok = _sample_valid(others.reshape(1, -1), num_negatives)  # (1, K)
        negatives = flat.detach().reshape(-1, dim)[neg_idx[0]]  # (K, D)
        positive_logit = (anchors @ prototype) / temperature  # (B, A)
        negative_logits = (anchors @ negatives.T) / temperature  # (B, A, K)
        negative_logits = negative_logits.masked_fill(~neg_ok[0], float("-inf"))
        logits = torch.cat([positive_logit.unsqueeze(-1), negative_logits], dim=-1)
        per_anchor = torch.logsumexp(logits, dim=-1) - positive_logit
        ok = anchor_ok.to(flat.dtype)
        total = total + (per_anchor * ok).sum(dim=1)
        count = count + ok.sum(dim=1)
    return torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros_like(total))


class ContrastivePseudoLabel(PseudoLabel):
    """CL / CL-QW (see module docstring).

    Args:
        in_channels: image channels ``C`` (3 RGB, 1 grey).
        spatial_dims: 2 or 3.
        contrastive_weight: ``lambda_c`` (0.1).
        temperature: ``tau`` (0.1).
        num_negatives: negatives per anchor (256).
        num_anchors: anchors per class per sample (32).
        embed_dim / hidden_dim: projection head sizes (16 / 32).
        feature_layer: dotted name of the student submodule whose input are the penultimate features;
            ``None`` uses the image instead (see module docstring).
        feature_channels: channels of those features (required with ``feature_layer``).
        source, confidence_threshold, quality_weighting, loss_function: as :class:`PseudoLabel`.
    """

    name = "cl"

    def __init__(
        self,
        in_channels: int = 3,
        spatial_dims: int = 2,
        contrastive_weight: float = 0.1,
        temperature: float = 0.1,
        num_negatives: int = 256,
        num_anchors: int = 32,
        embed_dim: int = 16,
        hidden_dim: int = 32,
        feature_layer: str | None = None,
        feature_channels: int | None = None,
        source: str = "student",
        confidence_threshold: float | None = 0.9,
        quality_weighting: QualityWeighting | None = None,
        loss_function: Callable[..., Tensor] | None = None,
    ) -> None:
        super().__init__(source, confidence_threshold, quality_weighting, loss_function)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if feature_layer is not None and not feature_channels:
            raise ValueError(f"feature_layer={feature_layer!r} needs feature_channels (channels of its input).")
        self.feature_layer = feature_layer
        self._captured: dict = {"active": False, "features": None}
        self._hook_handle = None
        context_channels = feature_channels if feature_layer is not None else in_channels
        conv = Conv[Conv.CONV, spatial_dims]
        pool = Pool[Pool.AVG, spatial_dims]
        self.spatial_dims = spatial_dims
        self.context_pools = nn.ModuleList([pool(3, stride=1, padding=1), pool(7, stride=1, padding=3)])
        self.projection_head = nn.Sequential(
            conv(context_channels + 3, hidden_dim, kernel_size=1),
            nn.ReLU(inplace=True),
            conv(hidden_dim, embed_dim, kernel_size=1),
        )
        self.contrastive_weight = float(contrastive_weight)
        self.temperature = float(temperature)
        self.num_negatives = int(num_negatives)
        self.num_anchors = int(num_anchors)

    def trainable_parameters(self):
        return self.projection_head.parameters()

    def setup(self, student: nn.Module) -> None:
        super().setup(student)
        if self.feature_layer is None or self._hook_handle is not None:
            return
        modules = dict(unwrap_parallel(student).named_modules())
        if self.feature_layer not in modules:
            names = [name for name in modules if name][:12]
            raise ValueError(
                f"feature_layer {self.feature_layer!r} is not a submodule of {type(student).__name__}; "
                f"e.g. {names}."
            )
        captured = self._captured

        def capture_input(module: nn.Module, args: tuple) -> None:
            # only the CL unlabeled forward is captured (copies of the student share this hook function)
            if captured["active"]:
                captured["features"] = args[0]

        self._hook_handle = modules[self.feature_layer].register_forward_pre_hook(capture_input)

    def student_logits_and_features(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """Student logits on ``image_u`` and the context ``h`` (features or the image) for the head."""
        if self.feature_layer is None:
            return ctx.student_logits_u(), ctx.image_u
        self._captured.update(active=True, features=None)
        try:
            logits_u = ctx.student(ctx.image_u)
        finally:
            self._captured["active"] = False
        features = self._captured["features"]
        self._captured["features"] = None
        if features is None:
            raise RuntimeError(f"feature_layer {self.feature_layer!r} was not called in the student's forward.")
        ctx.cache.setdefault("student_logits_u", logits_u)
        if features.shape[2:] != logits_u.shape[2:]:
            mode = "bilinear" if features.ndim == 4 else "trilinear"
            features = F.interpolate(features, size=logits_u.shape[2:], mode=mode, align_corners=False)
        return logits_u, features

    def embed(self, context: Tensor, probs: Tensor) -> Tensor:
        """``(B, embed_dim, *S)`` L2-normalised embeddings of ``cat([context, p, pool_3(p), pool_7(p)])``."""
        stacked = [context.to(probs.dtype), probs] + [pool(probs) for pool in self.context_pools]
        return F.normalize(self.projection_head(torch.cat(stacked, dim=1)).float(), dim=1)

    def unsupervised_loss(self, ctx: StepContext) -> MethodOutput:
        image_u = ctx.image_u
        logits_u, context = self.student_logits_and_features(ctx)
        probs = self.source_probabilities(ctx, logits_u)
        pseudo = hard_label(probs)
        mask = self.confidence_mask(probs)
        loss_fn = self.loss_fn(ctx)
        pl_loss = loss_fn(logits_u, pseudo, mask) if mask is not None else loss_fn(logits_u, pseudo)
        confident = torch.ones_like(pseudo, dtype=torch.bool) if mask is None else mask > 0
        embeddings = self.embed(context, torch.sigmoid(logits_u))
        contrastive = pixel_info_nce(
            embeddings, pseudo, confident, self.temperature, self.num_anchors, self.num_negatives
        )
        per_sample = pl_loss + self.contrastive_weight * contrastive
        logs = {"contrastive_loss": contrastive.mean().detach(), "pseudo_label_loss": pl_loss.mean().detach()}
        loss, weights = self.reduce(per_sample, image_u, pseudo, logs)
        return MethodOutput(unsup_loss=loss, quality_weights=weights, logs=logs)
