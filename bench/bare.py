"""The anchor of bench/serve.py: a bare FastAPI POST at the decision path.

One endpoint, ``POST /v1/customers/{customer_id}/decisions``, that validates a
small JSON body with pydantic and answers a small JSON dict rendered by orjson; no
database, no model, no auth. It is what the HTTP stack alone costs on this
machine, so the decision service is judged as a share of it in the same run.

Served as the real service is (``nbo serve``): uvicorn with uvloop and
httptools, an app factory, ``--workers`` processes::

    python bench/bare.py --port 8001 [--workers 1] [--access-log]

Access logging is off unless ``--access-log``: the anchor measures the HTTP
stack, not a log line per request.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Any, Literal

import orjson
from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

REPO = Path(__file__).resolve().parents[1]


class OrjsonResponse(JSONResponse):
    """A JSON answer rendered by orjson (FastAPI's own ORJSONResponse is deprecated and
    warns on every instance)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class DecisionRequest(BaseModel):
    """The decision request body of the contract."""

    channel: Literal["branch", "contact_centre", "digital", "chatbot"]
    staff_id: str | None = Field(default=None, max_length=64)
    branch_id: str | None = Field(default=None, max_length=64)
    max_offers: int = Field(default=3, ge=1, le=10)


def create_app() -> FastAPI:
    """The anchor app: one POST route, orjson answers, no docs routes."""
    app = FastAPI(
        title="nbo bench anchor",
        default_response_class=OrjsonResponse,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )

    @app.post("/v1/customers/{customer_id}/decisions", response_model=None)
    async def decide(customer_id: str, body: DecisionRequest) -> OrjsonResponse:
        # Returning the response itself: FastAPI then does no serialization of its own.
        return OrjsonResponse(
            {
                "decision_id": str(uuid.uuid4()),
                "customer_id": customer_id,
                "channel": body.channel,
                "offers": [],
            }
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--access-log", action="store_true", help="Log one line per request.")
    args = parser.parse_args()

    import uvicorn

    # Worker processes (spawned) inherit sys.path, so they can import bench.bare too.
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    uvicorn.run(
        "bench.bare:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        log_level="info",
        access_log=args.access_log,
    )


if __name__ == "__main__":
    main()
