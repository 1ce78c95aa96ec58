"""The coordinator as a Flower ``ServerApp`` (Message API): a thin main around
:func:`jacfusion_fed.server.federated.run_coordinator` (discover owners, train / FedAvg,
register heads, gather logits, fuse, evaluate, write results).

Run it the Flower way (``flwr run .``, ``[tool.flwr.app.components]`` of ``pyproject.toml``)
or through ``jacfusion-fed simulate``. It reads only the run config (as one typed
:class:`~jacfusion_fed.federation.run_config.RunConfig`, checked once at the start): never a
node config and never the pseudonym key.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from jacfusion_fed.server.federated import run_coordinator

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_coordinator(grid, context)
