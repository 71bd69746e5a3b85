"""A local datastore that refuses image ids and label tags naming paths outside the studies folder.

MONAI Label's ``LocalDatastore.add_image`` / ``save_label`` join the client's id to the studies folder
(``PUT /datastore/?image=../x`` would write outside it); ids and tags are checked here first.
"""

from __future__ import annotations

from typing import Any

from monailabel.datastore.local import LocalDatastore

from qgssl_monai.serving.label_logic import check_image_id

from .errors import http_errors


def _check(image_id: str, tag: str | None = None) -> None:
    with http_errors():
        check_image_id(image_id)
        if tag is not None:
            check_image_id(tag)


class SafeLocalDatastore(LocalDatastore):
    """:class:`LocalDatastore` whose write and delete operations validate ids and tags (400 otherwise)."""

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        if image_id:
            _check(image_id)
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        _check(image_id, label_tag)
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_image(self, image_id: str) -> None:
        _check(image_id)
        super().remove_image(image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        _check(label_id, label_tag)
        super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        _check(image_id)
        super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        _check(label_id, label_tag)
        super().update_label_info(label_id, label_tag, info)
