"""``SemiSupervisedTrainer``: MONAI ``SupervisedTrainer`` drawing a labeled and an unlabeled batch per step.

One iteration (``epoch_length`` of them per epoch for every method, SUP included):

1. labeled batch from ``train_data_loader`` (via ``prepare_batch``), unlabeled batch from
   ``unlabeled_data_loader`` (cycled: re-iterated when exhausted, ``DistributedSampler.set_epoch`` called
   with the pass index), skipped when ``method.uses_unlabeled`` is ``False``;
2. student forward on the labeled images (``FORWARD_COMPLETED``), per-sample supervised loss,
   ``method.unsupervised_loss(StepContext)``, total loss
   ``mean(sup) + extra_sup_loss + lambda(t) * unsup_loss`` (``LOSS_COMPLETED``);
3. one backward for everything (``BACKWARD_COMPLETED``), optimizer step, ``MODEL_COMPLETED``.

``engine.state.output`` holds ``image``, ``label``, ``pred`` (detached), and the floats ``loss``,
``sup_loss``, ``unsup_loss``, ``extra_sup_loss``, ``unsup_weight``, ``quality_weight_mean`` (1.0 when the
method does no quality weighting: every sample has weight 1) plus the method's ``logs``. The current
``lambda(t)`` lives in ``engine.state.unsup_weight`` (set by ``RampUpHandler``; ``lambda_max`` otherwise),
the last detached quality weights in ``engine.state.quality_weights``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from qgssl_monai.losses import PerSampleDiceBCELoss
from qgssl_monai.engines.autocast import resolve_amp_dtype
from qgssl_monai.methods.base import MethodOutput, SSLMethod, StepContext, unwrap_parallel
from qgssl_monai.methods.sup import Supervised

__all__ = ["SemiSupervisedTrainer", "distribute_peers", "resolve_batched_forward", "ssl_optimizer_parameters"]

logger = logging.getLogger(__name__)


#: keys of the scalar outputs, in the order they are converted to floats
SCALAR_KEYS = (Keys.LOSS, "sup_loss", "unsup_loss", "extra_sup_loss", "quality_weight_mean")


def ssl_optimizer_parameters(network: nn.Module, method: SSLMethod) -> list[nn.Parameter]:
    """All parameters the optimizer must own: the student's plus the method's extra trainable ones.

    Calls ``method.setup(network)`` first (idempotent) so peers/heads exist. Use it to build the optimizer
    in bundle configs, e.g.
    ``"$torch.optim.Adam(qgssl_monai.engines.ssl_optimizer_parameters(@network, @method), 1e-3)"``.
    """
    method.setup(network)
    params = [p for p in network.parameters() if p.requires_grad]
    seen = {id(p) for p in params}
    params += [p for p in method.trainable_parameters() if p.requires_grad and id(p) not in seen]
    return params


def has_batch_norm(network: nn.Module) -> bool:
    """True when ``network`` normalises with batch statistics in training (any ``_BatchNorm``)."""
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in network.modules())


def resolve_batched_forward(requested: bool | str, method: SSLMethod, network: nn.Module) -> bool:
    """Whether the engine runs the student once on ``cat([image_l, image_u])`` instead of twice.

    Allowed only for methods whose every iteration uses the student's logits on the clean unlabeled batch
    (``method.shares_student_forward_u``: PL*, QAR, CPS and their compositions). The result is the same
    function of the inputs *except* for BatchNorm: in training a BatchNorm layer normalises with the statistics
    of the batch it sees, so one ``B_l + B_u`` batch normalises both halves with joint statistics (and updates
    the running statistics once) where two forwards use per-half statistics. ``"auto"`` therefore batches only
    networks without BatchNorm (UNet, UNet++, SwinUNETR: instance/layer norm); ``True`` forces it (BatchNorm
    networks then train slightly differently), ``False`` never batches. The decision is logged.
    """
    allowed = bool(getattr(method, "shares_student_forward_u", False))
    if isinstance(requested, str):
        if requested.lower() != "auto":
            raise ValueError(f"batched_forward must be True, False or 'auto', got {requested!r}.")
        batch_norm = has_batch_norm(unwrap_parallel(network))
        enabled = allowed and not batch_norm
        reason = (
            f"method {method.name!r} does not share the student's unlabeled forward" if not allowed
            else "the network has BatchNorm (joint batch statistics would change training)" if batch_norm
            else "method shares the student's unlabeled forward and the network has no BatchNorm"
        )
        logger.info("batched labeled+unlabeled forward %s: %s", "on" if enabled else "off", reason)
        return enabled
    if requested and not allowed:
        raise ValueError(f"method {method.name!r} does not use the student's forward on the clean unlabeled batch: "
                         "batched_forward would compute logits nobody uses.")
    return bool(requested)


def distribute_peers(method: SSLMethod, network: nn.Module) -> None:
    """When the student is ``DistributedDataParallel``, wrap every method's trainable peer (CPS, FDPL) alike.

    Each peer gets its own DDP wrapper (same ``device_ids``/``output_device``/``broadcast_buffers``) used for its
    forwards, so its gradients are all-reduced across ranks exactly like the student's; the method keeps the
    unwrapped peer as its submodule, so checkpoints are the same with and without DDP.
    """
    ddp = network
    while not isinstance(ddp, nn.parallel.DistributedDataParallel):
        inner = getattr(ddp, "_orig_mod", None)  # torch.compile wrapper
        if inner is None:
            return
        ddp = inner

    def wrap(peer: nn.Module) -> nn.Module:
        return nn.parallel.DistributedDataParallel(
            peer,
            device_ids=ddp.device_ids,
            output_device=ddp.output_device,
            broadcast_buffers=ddp.broadcast_buffers,
            find_unused_parameters=ddp.find_unused_parameters,
        )

    for module in method.modules():
        if isinstance(module, SSLMethod):
            module.wrap_peers(wrap)


def _plain(tensor: Tensor | None) -> Tensor | None:
    """A MetaTensor's plain tensor (``torch.compile`` traces plain tensors; MONAI's compile workaround)."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


class SemiSupervisedTrainer(SupervisedTrainer):
    """Semi-supervised trainer: shared loop for every :class:`SSLMethod` strategy.

    Args (beyond ``monai.engines.SupervisedTrainer``, whose remaining arguments keep their meaning):
        loss_function: per-sample supervised loss ``(logits, target[, mask]) -> (B,)``;
            default :class:`~qgssl_monai.losses.PerSampleDiceBCELoss` (0.5 Dice + 0.5 BCE).
        unlabeled_data_loader: iterable of unlabeled batches (dicts with ``"image"``, tensors, or
            sequences whose first item is the image). Required unless the method is SUP.
        method: the SSL strategy; default :class:`~qgssl_monai.methods.sup.Supervised`.
        unsup_weight: ``lambda_max``; ``None`` uses ``method.default_unsup_weight``. ``RampUpHandler``
            sets the current value in ``engine.state.unsup_weight``.
        autocast_dtype: ``"bf16"`` (``torch.autocast`` on the engine's device, CPU or CUDA), ``"fp16"``
            (CUDA autocast + ``GradScaler``) or ``None`` (float32). ``amp_kwargs`` (MONAI's) are passed to that
            ``torch.autocast`` (e.g. ``{"cache_enabled": False}``); MONAI's ``amp=True`` means CUDA autocast in
            ``amp_kwargs["dtype"]`` (float16 by default) and cannot be combined with ``autocast_dtype``.
        batched_forward: run the student once on ``cat([image_l, image_u])`` (``True``/``False``/``"auto"``, see
            :func:`resolve_batched_forward` for the BatchNorm caveat).
        train_handlers: as in MONAI; attached after the SSL attributes exist.
        **kwargs: every other ``SupervisedTrainer`` argument, forwarded unchanged (``epoch_length``,
            ``prepare_batch``, ``inferer``, ``compile``/``compile_kwargs``, ``to_kwargs``, ``amp_kwargs``,
            ``optim_set_to_none``, ...). ``compile=True`` wraps the network with ``torch.compile``; its inputs are
            then plain tensors (MONAI's MetaTensor workaround). ``accumulation_steps`` must stay 1.

    When ``network`` is ``DistributedDataParallel``, the method's trainable peers are wrapped alike
    (:func:`distribute_peers`), so their gradients are averaged across ranks too.

    The method's extra trainable parameters (peers, heads) must be in the optimizer: build it with
    :func:`ssl_optimizer_parameters`; missing ones are added as a new param group with a warning.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: Callable[..., Tensor] | None = None,
        unlabeled_data_loader: Iterable | DataLoader | None = None,
        method: SSLMethod | None = None,
        unsup_weight: float | None = None,
        autocast_dtype: str | torch.dtype | None = None,
        batched_forward: bool | str = False,
        train_handlers: Sequence | None = None,
        **kwargs: Any,
    ) -> None:
        # one dtype vocabulary for every engine: "bf16" | "fp16" | "none"/None (engines/autocast.py)
        dtype = resolve_amp_dtype(autocast_dtype)
        device = torch.device(device)
        if kwargs.pop("amp", False):  # MONAI's switch: CUDA autocast (float16 unless amp_kwargs says otherwise)
            if dtype is not None:
                raise ValueError("pass either amp=True (MONAI) or autocast_dtype, not both.")
            if device.type != "cuda":
                raise ValueError(f"amp=True autocasts on CUDA only (device {device}); use autocast_dtype='bf16' on CPU.")
            dtype = resolve_amp_dtype((kwargs.get("amp_kwargs") or {}).get("dtype", torch.float16))
        if dtype is torch.float16 and device.type != "cuda":
            raise ValueError(f"autocast_dtype='fp16' needs a CUDA device (got {device}); use 'bf16' on CPU.")
        if kwargs.get("accumulation_steps", 1) != 1:
            raise ValueError("SemiSupervisedTrainer does not support gradient accumulation (accumulation_steps=1).")
        method = Supervised() if method is None else method
        if not isinstance(method, SSLMethod):
            raise TypeError(f"method must be an SSLMethod, got {type(method).__name__}.")
        if method.uses_unlabeled and unlabeled_data_loader is None:
            raise ValueError(f"method {method.name!r} needs an unlabeled_data_loader.")
        # every other SupervisedTrainer option (compile, compile_kwargs, amp_kwargs, to_kwargs, inferer, ...)
        # keeps MONAI's meaning; mixed precision is ours (``autocast_dtype``, any device), hence amp=False
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=PerSampleDiceBCELoss() if loss_function is None else loss_function,
            train_handlers=None,  # attached below, once the SSL attributes exist
            amp=False,
            **kwargs,
        )
        method.setup(unwrap_parallel(network))
        self.method = method.to(device)
        self.unlabeled_data_loader = unlabeled_data_loader
        self.unsup_weight_max = float(method.default_unsup_weight if unsup_weight is None else unsup_weight)
        self.autocast_dtype = dtype
        self.grad_scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
        self.batched_forward = resolve_batched_forward(batched_forward, method, network)
        self.state.unsup_weight = self.unsup_weight_max
        self.state.quality_weights = None
        self._unlabeled_iterator: Iterator | None = None
        self._unlabeled_pass = 0
        self._add_missing_method_parameters()
        distribute_peers(method, network)
        self.add_event_handler(Events.STARTED, self._sync_unlabeled_pass)
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    def _add_missing_method_parameters(self) -> None:
        owned = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [p for p in self.method.trainable_parameters() if p.requires_grad and id(p) not in owned]
        if missing:
            warnings.warn(
                f"{len(missing)} trainable parameters of method {self.method.name!r} were not in the optimizer; "
                "adding them as a new param group (build the optimizer with ssl_optimizer_parameters to avoid this)."
            )
            self.optimizer.add_param_group({"params": missing})

    def _sync_unlabeled_pass(self, engine: SemiSupervisedTrainer) -> None:
        """On (re)start, continue the unlabeled pass count from the iteration count, so a resumed run's
        ``DistributedSampler`` shuffles with the same pass index (the position within that pass restarts)."""
        self._unlabeled_iterator = None
        if self.unlabeled_data_loader is None or not isinstance(self.unlabeled_data_loader, Sized):
            return
        try:
            batches_per_pass = len(self.unlabeled_data_loader)
        except TypeError:  # iterable dataset without length
            return
        if batches_per_pass > 0:
            self._unlabeled_pass = int(self.state.iteration) // batches_per_pass

    def next_unlabeled_batch(self) -> Tensor:
        """Next unlabeled image batch ``(B_u, C, *S)`` on the engine's device; the loader is cycled."""
        if self._unlabeled_iterator is None:
            self._unlabeled_iterator = self._start_unlabeled_pass()
        try:
            batch = next(self._unlabeled_iterator)
        except StopIteration:
            self._unlabeled_pass += 1
            self._unlabeled_iterator = self._start_unlabeled_pass()
            try:
                batch = next(self._unlabeled_iterator)
            except StopIteration as empty:
                raise RuntimeError("unlabeled_data_loader yielded no batch.") from empty
        if isinstance(batch, dict):
            image = batch[Keys.IMAGE]
        elif isinstance(batch, Tensor):
            image = batch
        else:
            image = batch[0]
        return image.to(device=self.state.device, non_blocking=self.non_blocking, **self.to_kwargs)

    def _start_unlabeled_pass(self) -> Iterator:
        sampler = getattr(self.unlabeled_data_loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(self._unlabeled_pass)
        return iter(self.unlabeled_data_loader)  # type: ignore[arg-type]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        options = {k: v for k, v in (self.amp_kwargs or {}).items() if k not in ("dtype", "device_type")}
        return torch.autocast(self.state.device.type, dtype=self.autocast_dtype, **options)

    def _student_forward(self, image_l: Tensor, image_u: Tensor | None, args: tuple, kwargs: dict,
                         context_cache: dict) -> Tensor:
        """Student logits on ``image_l``; with ``batched_forward`` one forward on ``cat([image_l, image_u])`` whose
        unlabeled half is put in ``context_cache`` for :meth:`StepContext.student_logits_u`."""
        if not self.batched_forward or image_u is None:
            return self.inferer(image_l, self.network, *args, **kwargs)
        logits = self.inferer(torch.cat([image_l, image_u]), self.network, *args, **kwargs)
        logits_l, context_cache["student_logits_u"] = logits.split([image_l.shape[0], image_u.shape[0]])
        return logits_l

    def _iteration(self, engine: SemiSupervisedTrainer, batchdata: dict[str, Tensor]) -> dict:  # type: ignore[override]
        """One SSL step; returns ``engine.state.output`` (see the module docstring for its keys)."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        image_l, label_l = batch[0], batch[1]
        args, kwargs = (batch[2], batch[3]) if len(batch) == 4 else ((), {})
        image_u = engine.next_unlabeled_batch() if engine.method.uses_unlabeled else None
        engine.state.output = {Keys.IMAGE: image_l, Keys.LABEL: label_l}
        if engine.compile:  # compiled graphs take plain tensors (the output keeps the MetaTensors)
            image_l, label_l, image_u = _plain(image_l), _plain(label_l), _plain(image_u)

        engine.network.train()
        engine.method.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        unsup_weight = float(engine.state.unsup_weight)
        cache: dict[str, Any] = {}
        with engine._autocast():
            logits_l = engine._student_forward(image_l, image_u, args, kwargs, cache)
            engine.state.output[Keys.PRED] = logits_l
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            sup_loss = engine.loss_function(logits_l, label_l).mean()
            context = StepContext(
                engine=engine,
                student=engine.network,
                image_l=image_l,
                label_l=label_l,
                logits_l=logits_l,
                image_u=image_u,
                sup_loss_fn=engine.loss_function,
                cache=cache,
            )
            method_output: MethodOutput = engine.method.unsupervised_loss(context)
            loss = sup_loss + method_output.extra_sup_loss + unsup_weight * method_output.unsup_loss
            engine.state.output[Keys.LOSS] = loss
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        if engine.grad_scaler is not None:
            engine.grad_scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.grad_scaler.step(engine.optimizer)
            engine.grad_scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()

        engine._store_outputs(loss, sup_loss, logits_l, method_output, unsup_weight)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _store_outputs(
        self, loss: Tensor, sup_loss: Tensor, logits_l: Tensor, method_output: MethodOutput, unsup_weight: float
    ) -> None:
        """Detach everything kept on ``state`` and convert all logged scalars with one ``tolist`` sync."""
        weights = method_output.quality_weights
        self.state.quality_weights = None if weights is None else weights.detach()
        log_names = list(method_output.logs)
        scalars = [
            loss.detach(),
            sup_loss.detach(),
            torch.as_tensor(method_output.unsup_loss).detach(),
            torch.as_tensor(method_output.extra_sup_loss).detach(),
            weights.detach().float().mean() if weights is not None and weights.numel() else torch.ones(()),
        ]
        scalars += [torch.as_tensor(method_output.logs[name]).detach() for name in log_names]
        device = loss.device
        values = torch.stack([s.to(device=device, dtype=torch.float32).reshape(()) for s in scalars]).tolist()
        output = self.state.output
        output[Keys.PRED] = logits_l.detach()
        output.update(zip(SCALAR_KEYS + tuple(log_names), values))
        output["unsup_weight"] = unsup_weight

    def run(self) -> None:  # type: ignore[override]
        if getattr(self.method, "requires_ema_teacher", False) and not getattr(self, "ema_teacher_attached", False):
            warnings.warn(
                f"method {self.method.name!r} has an EMA teacher but no EMATeacherHandler is attached: "
                "the teacher will stay at its initial weights."
            )
        super().run()
