"""fedseek site daemon: Flower ClientApp. Round handling lives in fedseek.runtime.site.

Simulated faults (drop-outs, Byzantine updates) are a mod on the train handler that acts only
in simulations whose scenario asks for them; a deployed site passes straight through it.
`secure_aggregation` runs Flower's SecAgg+ protocol for the messages of a distributed-DP round
(privacy.mode distributed) and passes every other message through.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedseek.runtime.faults import simulated_faults
from fedseek.runtime.site import handle_evaluate, handle_query, handle_stats, handle_train
from fedseek.runtime.site_secure import secure_aggregation

app = ClientApp()


@app.train(mods=[secure_aggregation, simulated_faults])
def train(msg: Message, context: Context) -> Message:
    """Local (DP-)training on the site's private data."""
    return handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's held-out records (never the training rows); DP-noised under a privacy policy."""
    return handle_evaluate(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the coordinator which site this node is."""
    return handle_query(msg, context)


@app.query("stats")
def stats(msg: Message, context: Context) -> Message:
    """scaling: federated: this site's (DP-noised, ledger-charged) sums for the federation's scaling statistics."""
    return handle_stats(msg, context)
