"""``nbo report``: conversion, uplift, NPS and CSAT reports as tables or CSV."""

from __future__ import annotations

import typer

report_app = typer.Typer(help="Reports over an explicit date range.", no_args_is_help=True)
