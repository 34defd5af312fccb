"""The model card of the model being served."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from retinagrade.api.dependencies import ServiceDep

router = APIRouter(prefix="/v1", tags=["model"])


@router.get("/model", summary="The model card (name, version, sha256, training, metrics, limitations)")
def model_card(service: ServiceDep) -> dict[str, Any]:
    return {**service.pipeline.spec.public_card(), **service.sites.cards()}
