"""The served OpenAPI document, rendered as the YAML kept at the top of the repository."""

from __future__ import annotations

import yaml
from fastapi import FastAPI


def render_openapi(app: FastAPI) -> str:
    """The app's OpenAPI spec as YAML (key order kept, so diffs stay readable)."""
    rendered: str = yaml.safe_dump(app.openapi(), sort_keys=False, allow_unicode=True, width=100)
    return rendered
