"""SUP: the supervised baseline (labeled data only) run through the same SSL engine."""

from __future__ import annotations

from qgssl_monai.methods.base import MethodOutput, SSLMethod, StepContext

__all__ = ["Supervised"]


class Supervised(SSLMethod):
    """Labeled data only: no unlabeled batch is drawn and ``unsup_loss`` is a constant 0.

    It still runs ``epoch_length`` optimizer steps per epoch like every SSL method, so that
    comparisons use the same number of updates.
    """

    name = "sup"
    uses_unlabeled = False
    default_unsup_weight = 0.0

    def unsupervised_loss(self, ctx: StepContext) -> MethodOutput:
        return MethodOutput(unsup_loss=ctx.logits_l.new_zeros(()).float())
