"""`python -m fleetplane.cli`: the same as the `fleetplane` command."""

from fleetplane.cli.main import app

app()
