"""fedseek coordinator: Flower ServerApp. The round loop lives in fedseek.coordinator."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedseek.coordinator import run_coordinator

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation named by the run config (scenario or coordinator YAML)."""
    run_coordinator(grid, context)
