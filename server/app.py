"""fedseek coordinator: Flower ServerApp. The round loop lives in fedseek.runtime.coordinator."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedseek.runtime.coordinator import run_coordinator

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation named by the run config (scenario or coordinator YAML)."""
    run_coordinator(grid, context)
