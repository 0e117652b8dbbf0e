"""Catalogue administration, model versions and rules for analysts.

GET/PUT /v1/products[/{code}], GET /v1/models, POST /v1/models/{version}/activate,
GET /v1/rules.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response

from models.rules import rule_sentence, select_rules
from service import metrics, validation
from service.api.deps import EngineDep, ServingDep
from service.auth import Principal, require
from service.data import catalogue, registry
from service.data.db import unit_of_work
from service.data.tables import ModelVersion, Product
from service.decision.sharing import sharing_the_interpreter
from service.decision.state import prepare_store
from service.errors import Invalid, Unavailable
from service.schemas import (
    ActivationResponse,
    Identifier,
    ModelVersionOut,
    ProductRequest,
    ProductResponse,
    RuleOut,
    RulesResponse,
    Text,
)

router = APIRouter(prefix="/v1")
log = logging.getLogger("nbo.catalogue")

# One rule for a product code wherever it is named (the importer's, service.validation).
ProductCodePath = Annotated[
    Identifier,
    Path(
        min_length=1,
        max_length=validation.MAX_PRODUCT_CODE,
        pattern=validation.PRODUCT_CODE_PATTERN,
        description="The product's code: letters, digits, _ . - (at most 64).",
    ),
]


def _product_out(row: Product) -> ProductResponse:
    return ProductResponse(
        product_code=row.code,
        name=row.name,
        category=row.category,
        value=row.value,
        business_weight=row.business_weight,
        active=row.active,
        min_age=row.min_age,
        max_age=row.max_age,
        segments=row.segments,
        requires=row.requires or [],
        excludes=row.excludes or [],
    )


@router.get(
    "/products",
    operation_id="listProducts",
    summary="The product catalogue",
    tags=["catalogue"],
    response_model=list[ProductResponse],
)
def list_products(
    principal: Annotated[Principal, Depends(require("catalogue"))], engine: EngineDep
) -> list[ProductResponse]:
    with unit_of_work(engine) as session:
        return [_product_out(p) for p in catalogue.list_products(session)]


@router.get(
    "/products/{code}",
    operation_id="getProduct",
    summary="One product",
    tags=["catalogue"],
    response_model=ProductResponse,
    responses={404: {"description": "Unknown product."}},
)
def get_product(
    code: ProductCodePath,
    principal: Annotated[Principal, Depends(require("catalogue"))],
    engine: EngineDep,
) -> ProductResponse:
    with unit_of_work(engine) as session:
        return _product_out(catalogue.get_product(session, code=code))


@router.put(
    "/products/{code}",
    operation_id="putProduct",
    summary="Create or replace a product",
    description=(
        "Value, business weight (arbitration multiplies propensity x value x weight), "
        "eligibility (ages, segments, required and excluded products) and whether it is "
        "active. Every worker reloads its catalogue within seconds. Needs scope 'catalogue'."
    ),
    tags=["catalogue"],
    response_model=ProductResponse,
    responses={201: {"description": "Created.", "model": ProductResponse}},
)
async def put_product(
    response: Response,
    code: ProductCodePath,
    body: ProductRequest,
    principal: Annotated[Principal, Depends(require("catalogue"))],
    engine: EngineDep,
    state: ServingDep,
) -> ProductResponse:
    def write() -> tuple[ProductResponse, bool]:
        with unit_of_work(engine) as session:
            row, created = catalogue.put_product(session, code=code, body=body, origin=state.origin)
            return _product_out(row), created

    answer, created = await asyncio.to_thread(write)
    # Load the new catalogue fully, then swap (requests keep the old one meanwhile).
    try:
        await asyncio.to_thread(state.load)
    except Exception:  # noqa: BLE001 - the write is committed: answer what happened to it
        log.exception("catalogue reload failed after a product write", extra={"product": code})
    response.status_code = 201 if created else 200
    return answer


@router.get(
    "/models",
    operation_id="listModels",
    summary="Model versions, newest first",
    tags=["models"],
    response_model=list[ModelVersionOut],
)
def list_models(
    principal: Annotated[Principal, Depends(require("models"))], engine: EngineDep
) -> list[ModelVersionOut]:
    with unit_of_work(engine) as session:
        return [_version_out(row) for row in registry.list_versions(session)]


def _version_out(row: ModelVersion) -> ModelVersionOut:
    return ModelVersionOut(
        version=row.version,
        status=row.status,
        as_of=row.as_of,
        horizon_days=row.horizon_days,
        created_at=row.created_at,
        activated_at=row.activated_at,
        metrics=row.metrics or {},
    )


@router.post(
    "/models/{version}/activate",
    operation_id="activateModel",
    summary="Make a model version the active one",
    description=(
        "Checks the bundle (checksums, feature columns) and builds this machine's serving "
        "store of the version (minutes at a million customers, while the current version "
        "serves) before anything changes; then marks it active and this worker swaps it "
        "in without failing a request. Other workers follow within seconds. Needs scope "
        "'models'."
    ),
    tags=["models"],
    response_model=ActivationResponse,
    responses={
        404: {"description": "Unknown version."},
        422: {"description": "Bundle fails its checks."},
        503: {"description": "The version's serving store could not be built; nothing changed."},
    },
)
async def activate_model(
    version: Annotated[Text, Path(min_length=1, max_length=64)],
    principal: Annotated[Principal, Depends(require("models"))],
    engine: EngineDep,
    state: ServingDep,
) -> ActivationResponse:
    # Both steps load the version's bundle (JSON, rules, boosters: tens of milliseconds
    # of Python at a million customers) on a thread beside the requests: sharing the
    # interpreter, a request waits for it at most 0.5 ms at a time, not the default 5.
    serving = state.snapshot is not None

    def activate() -> str | None:
        with sharing_the_interpreter(serving), unit_of_work(engine) as session:
            # Checked through this machine's cache, which the reload below then reuses.
            return registry.activate_version(
                session,
                version=version,
                origin=state.origin,
                cache_dir=state.settings.artifacts_dir,
            )

    def prepare() -> None:
        try:
            with sharing_the_interpreter(serving):
                prepare_store(engine, state.settings, version)
        except registry.RegistryError:
            return  # unknown, or a bundle that fails its checks: activate() says which
        except Exception as exc:
            log.error("serving store build failed", extra={"version": version}, exc_info=True)
            raise Unavailable(
                f"the serving store of version '{version}' could not be built "
                f"({type(exc).__name__}); nothing was changed, the current version serves"
            ) from None

    # The version's serving store first, while the current version serves: built in a
    # low-priority child (minutes at a million customers), so the activation's swap maps
    # it in this worker and every other one without a pause.
    await asyncio.to_thread(prepare)
    try:
        previous = await asyncio.to_thread(activate)
    except Invalid:
        # The bundle failed its checks: a failed load, though nothing was swapped.
        metrics.MODEL_LOADS.labels("failure").inc()
        raise
    snapshot = await asyncio.to_thread(state.load)
    metrics.MODEL_LOADS.labels("success" if snapshot.model is not None else "failure").inc()
    metrics.set_active_model(snapshot.version)
    return ActivationResponse(version=version, previous=previous, serving=snapshot.version)


@router.get(
    "/rules",
    operation_id="listRules",
    summary="Mined adoption-sequence rules of the served model",
    description="Best first (confidence, lift, customers). Needs scope 'rules'.",
    tags=["models"],
    response_model=RulesResponse,
    responses={503: {"description": "No model is loaded."}},
)
def list_rules(
    principal: Annotated[Principal, Depends(require("rules"))],
    state: ServingDep,
    consequent: Annotated[Text | None, Query(max_length=64)] = None,
    min_confidence: Annotated[float, Query(ge=0, le=1)] = 0.0,
    min_lift: Annotated[float, Query(ge=0, allow_inf_nan=False)] = 0.0,
    ordered: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> RulesResponse:
    snapshot = state.snapshot
    if snapshot is None or snapshot.model is None:
        raise Unavailable("no model version is loaded: train one with `nbo train`")
    if consequent is not None and consequent not in snapshot.catalogue.index:
        raise Invalid(
            f"consequent: unknown product '{consequent}'",
            errors=[{"field": "consequent", "message": "unknown product"}],
        )
    chosen = select_rules(
        [] if snapshot.model.rules is None else snapshot.model.rules.rules,
        consequent=consequent,
        min_confidence=min_confidence,
        min_lift=min_lift,
        ordered=ordered,
        limit=limit,
    )
    names = {code: name for code, name in snapshot.names.items()}
    return RulesResponse(
        model_version=snapshot.version or "",
        rules=[
            RuleOut(
                antecedent=list(r.antecedent),
                ordered=r.ordered,
                consequent=r.consequent,
                support=r.support,
                confidence=r.confidence,
                lift=r.lift,
                conviction=r.conviction
                if r.conviction == r.conviction and r.conviction != float("inf")
                else 1e9,
                n_customers=r.n_customers,
                median_days=r.median_days,
                sentence=rule_sentence(r, names),
            )
            for r in chosen
        ],
    )
