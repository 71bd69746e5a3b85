"""The SSL strategy contract shared by the engine and every method (see docs/ARCHITECTURE.md).

A method owns only its unsupervised loss and its extra networks (EMA teacher, peer, projection
head); the engine, loaders, supervised loss, logging and checkpointing are shared. The engine
builds a :class:`StepContext` each iteration and adds ``lambda(t) * unsup_loss + extra_sup_loss``
to the mean per-sample supervised loss.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from qgssl_monai.engines.ssl_trainer import SemiSupervisedTrainer

__all__ = [
    "StepContext",
    "MethodOutput",
    "SSLMethod",
    "EMATeacherMixin",
    "training_progress",
    "frozen_copy",
    "independent_peer",
    "reinitialise",
    "unwrap_parallel",
]


@dataclass
class StepContext:
    """Everything a method may use in one training iteration (built by the engine).

    Attributes:
        engine: the running trainer; ``engine.state.epoch``/``iteration``/``max_epochs``/``epoch_length``/
            ``unsup_weight`` are available.
        student: the segmenter ``f`` (one logit channel), in train mode.
        image_l: ``(B_l, C, *S)`` labeled images.
        label_l: ``(B_l, 1, *S)`` labels in ``{0, 1}``.
        logits_l: ``(B_l, 1, *S)`` student logits on ``image_l`` (part of the autograd graph).
        image_u: ``(B_u, C, *S)`` unlabeled images, or ``None`` when the method does not use them.
        sup_loss_fn: per-sample loss ``(logits, target[, mask]) -> (B,)``.
        cache: per-iteration scratch space shared by the method's components (see :meth:`student_logits_u`).
    """

    engine: SemiSupervisedTrainer
    student: nn.Module
    image_l: Tensor
    label_l: Tensor
    logits_l: Tensor
    image_u: Tensor | None
    sup_loss_fn: Callable[..., Tensor]
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def student_logits_u(self) -> Tensor:
        """Student logits ``(B_u, 1, *S)`` on the clean unlabeled batch, computed once per iteration (with grad).

        Methods (and components of a composite method) that need the same forward share it, so e.g.
        QAR+QW runs the student once on ``image_u``.
        """
        if self.image_u is None:
            raise RuntimeError("this iteration has no unlabeled batch (method.uses_unlabeled is False).")
        if "student_logits_u" not in self.cache:
            self.cache["student_logits_u"] = self.student(self.image_u)
        return self.cache["student_logits_u"]


@dataclass
class MethodOutput:
    """What a method returns for one iteration.

    Attributes:
        unsup_loss: scalar unsupervised loss *before* the engine's ``lambda(t)``.
        extra_sup_loss: supervised loss of extra trainable networks (CPS / FDPL peers), added unweighted.
        quality_weights: detached per-sample quality weights ``(B_u,)`` (``(k * B_u,)`` when a method
            weights ``k`` pseudo-label sets, e.g. CPS) or ``None`` without quality weighting.
        logs: extra scalars to expose in ``engine.state.output`` (floats or 0-dim tensors; the engine
            converts all of them to floats with one device sync).
    """

    unsup_loss: Tensor
    extra_sup_loss: Tensor | float = 0.0
    quality_weights: Tensor | None = None
    logs: dict[str, Any] = field(default_factory=dict)


def training_progress(engine: Any) -> float:
    """Fraction of the training run completed, in ``[0, 1]``: ``(iteration - 1) / (max_epochs * epoch_length)``."""
    state = engine.state
    total = max(int(state.max_epochs or 1) * int(state.epoch_length or 1), 1)
    return min(max((int(state.iteration) - 1) / total, 0.0), 1.0)


def unwrap_parallel(network: nn.Module) -> nn.Module:
    """The module inside ``DataParallel``/``DistributedDataParallel`` and ``torch.compile`` wrappers (in any
    nesting): teachers and peers copy that, EMA reads its parameters."""
    while True:
        if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            network = network.module
        elif isinstance(getattr(network, "_orig_mod", None), nn.Module):  # torch._dynamo OptimizedModule
            network = network._orig_mod
        else:
            return network


def reinitialise(network: nn.Module, seed: int) -> nn.Module:
    """Re-draw (in place) every submodule that has ``reset_parameters`` from ``seed``, on a forked RNG so the
    run's global random stream is untouched. Returns ``network``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for module in network.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return network


def independent_peer(network: nn.Module, seed: int) -> nn.Module:
    """A co-training peer (CPS, FDPL): ``network``'s architecture (unwrapped from DP/DDP, deep-copied) with its
    own initialisation drawn from ``seed`` and every parameter trainable.

    The weights never depend on how ``network`` was initialised, so a peer built from the same config as a
    seeded student is still independent of it.
    """
    peer = reinitialise(copy.deepcopy(unwrap_parallel(network)), seed)
    for param in peer.parameters():
        param.requires_grad_(True)
    return peer


def frozen_copy(network: nn.Module) -> nn.Module:
    """Deep copy of ``network`` (unwrapped from DP/DDP) with ``requires_grad=False`` everywhere (teachers)."""
    teacher = copy.deepcopy(unwrap_parallel(network))
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


class SSLMethod(nn.Module, abc.ABC):
    """Base class of SSL strategies. Teacher/peer/head networks are submodules (saved in checkpoints).

    Class attributes:
        name: registry name, e.g. ``"mt-qw"``.
        uses_unlabeled: ``False`` lets the engine skip drawing unlabeled batches (SUP).
        default_unsup_weight: the method's ``lambda_max`` default, used by the engine when its
            ``unsup_weight`` is ``None``.
    """

    name: str = "ssl"
    uses_unlabeled: bool = True
    default_unsup_weight: float = 1.0
    #: names of submodules that must always stay in eval mode (frozen teachers, quality predictors)
    eval_only_submodules: tuple[str, ...] = ()
    #: names of trainable peer submodules (CPS, FDPL) wrapped like the student for data-parallel training
    peer_submodules: tuple[str, ...] = ()
    #: True when every iteration uses ``ctx.student_logits_u()`` (the student on the clean unlabeled batch):
    #: the engine may then compute it in one forward with the labeled batch (``batched_forward``)
    shares_student_forward_u: bool = False

    def wrap_peers(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Use ``wrap(peer)`` (e.g. a ``DistributedDataParallel``) for the forwards of each ``peer_submodules``
        entry. The wrapper is not registered as a submodule: state dicts keep the unwrapped peer's keys."""
        wrappers = self.__dict__.setdefault("_peer_wrappers", {})
        for name in self.peer_submodules:
            peer = getattr(self, name, None)
            if isinstance(peer, nn.Module) and name not in wrappers:
                wrappers[name] = wrap(peer)

    def peer_module(self, name: str = "peer") -> nn.Module:
        """The module to call for peer ``name``: its data-parallel wrapper when :meth:`wrap_peers` made one."""
        wrapper = self.__dict__.get("_peer_wrappers", {}).get(name)
        return wrapper if wrapper is not None else getattr(self, name)

    def setup(self, student: nn.Module) -> None:
        """Create networks that depend on the student (EMA teacher, peer). Must be idempotent."""

    @abc.abstractmethod
    def unsupervised_loss(self, ctx: StepContext) -> MethodOutput:
        """Unsupervised loss of one iteration (before ``lambda``)."""

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Extra parameters the optimizer must update (peers, projection heads); none by default."""
        return iter(())

    @property
    def requires_ema_teacher(self) -> bool:
        """True when this method (or a component of it) owns an EMA teacher needing ``EMATeacherHandler``."""
        return any(getattr(module, "teacher", None) is not None for module in self.modules()
                   if isinstance(module, EMATeacherMixin))

    def train(self, mode: bool = True) -> SSLMethod:
        super().train(mode)
        for module_name in self.eval_only_submodules:
            module = getattr(self, module_name, None)
            if isinstance(module, nn.Module):
                module.eval()
        return self

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class EMATeacherMixin:
    """Adds an EMA teacher (``self.teacher``) created in :meth:`setup` as a frozen deep copy of the student.

    The teacher is updated by :class:`qgssl_monai.handlers.ema.EMATeacherHandler` after each iteration;
    it is kept in eval mode (its BatchNorm statistics are the EMA-copied student buffers).
    """

    teacher: nn.Module | None
    eval_only_submodules: tuple[str, ...] = ("teacher",)

    def setup_teacher(self, student: nn.Module) -> None:
        if getattr(self, "teacher", None) is None:
            # plain attribute assignment registers the submodule on nn.Module
            self.teacher = frozen_copy(student)
            self.teacher.eval()

    @torch.no_grad()
    def teacher_logits(self, image: Tensor) -> Tensor:
        """``(B, 1, *S)`` teacher logits under ``no_grad``."""
        if self.teacher is None:
            raise RuntimeError(f"{type(self).__name__}.setup(student) must be called before using the teacher.")
        return self.teacher(image)
