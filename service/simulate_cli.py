"""``nbo simulate``: a closed-loop simulation of nbo on the synthetic bank."""

from __future__ import annotations

import typer

simulate_app = typer.Typer(help="Closed-loop simulation on the synthetic bank.")
