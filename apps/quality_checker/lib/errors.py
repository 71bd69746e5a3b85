"""Turn the library's request errors into HTTP answers.

MONAI Label 0.8.5 has no exception handler for its own ``MONAILabelException`` (any exception in a task
becomes a 500), but a ``fastapi.HTTPException`` raised anywhere below an endpoint reaches the client with
its status code and ``detail``; :func:`http_errors` maps :class:`LabelRequestError` to one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import HTTPException

from qgssl_monai.serving.label_logic import LabelRequestError


@contextmanager
def http_errors() -> Iterator[None]:
    """Re-raise :class:`LabelRequestError` as ``HTTPException(status_code, detail)``."""
    try:
        yield
    except LabelRequestError as err:
        raise HTTPException(status_code=err.status_code, detail=err.detail) from err
