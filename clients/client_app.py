"""The modality owner as a Flower ``ClientApp`` (Message API).

Thin handlers: each one opens the owner's workspace from its node config and calls
:mod:`jacfusion_fed.clients.task`. Message types and records:
:mod:`jacfusion_fed.federation.protocol`.

- ``train``: train locally (or one FedAvg round, or publish the FedAvg model), reply with the
  head (Gram matrix by default), class counts, the model version and metrics. FedAvg rounds
  pass through Flower's SecAgg+ and DP clipping mods when the coordinator runs them
  (:func:`jacfusion_fed.federation.private.train_mods`; each acts only on its own messages).
- ``query``: K logits per requested pseudonym from a named model version, clean or under
  perturbations applied here to the owner's own inputs.
- ``query.describe``: modality, owner name, K, current version, architecture.
- ``query.head``: the head of a stored version (no training).

Run it the Flower way (``flwr run .``, ``[tool.flwr.app.components]`` of ``pyproject.toml``)
or through ``jacfusion-fed simulate``.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from jacfusion_fed.federation.private import train_mods

from . import task

app = ClientApp()


@app.train(mods=train_mods())
def train(msg: Message, context: Context) -> Message:
    return task.respond(msg, context, task.train)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return task.respond(msg, context, task.query_logits)


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    return task.respond(msg, context, task.describe)


@app.query("head")
def head(msg: Message, context: Context) -> Message:
    return task.respond(msg, context, task.head_reply)
