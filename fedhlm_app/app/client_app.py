"""fedhlm: the ClientApp, an edge device hosting the SLM.

Each handler decodes its message (``protocol``), calls one operation of the node
(``node.Node``) and encodes the reply. The message types, in the order a run sends
them, are listed in ``fedhlm_app.app.protocol``; what the node keeps between them is
listed in ``fedhlm_app.app.node``.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedhlm_app.app import protocol
from fedhlm_app.app.node import Node

app = ClientApp()


def _reply(msg: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=msg)


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    """Load (and featurize) the local data; report cluster and sizes."""
    return _reply(msg, Node.of(context).setup().pack())


@app.train("encoder")
def train_encoder(msg: Message, context: Context) -> Message:
    """Fine-tune the encoder's top layers from the replica the message moves."""
    return _reply(msg, Node.of(context).train_encoder(protocol.Train.unpack(msg.content)).pack())


@app.query("install_encoder")
def install_encoder(msg: Message, context: Context) -> Message:
    """Install the fine-tuned encoder and featurize the local data with it."""
    return _reply(msg, Node.of(context).install_encoder(protocol.unpack_model(msg.content["model"])).pack())


@app.train("head")
def train_head(msg: Message, context: Context) -> Message:
    """Fit the head on the local fit split from the replica the message moves."""
    return _reply(msg, Node.of(context).train_head(protocol.Train.unpack(msg.content)).pack())


@app.query("install_head")
def install_head(msg: Message, context: Context) -> Message:
    """Keep the final head's outputs (and a resumed client's memory)."""
    Node.of(context).install_head(protocol.InstallHead.unpack(msg.content))
    return _reply(msg, RecordDict())


@app.query("calibrate")
def calibrate(msg: Message, context: Context) -> Message:
    """Send the calibration items the LLM should judge this threshold round."""
    return _reply(msg, Node.of(context).calibrate(protocol.Calibrate.unpack(msg.content)).pack())


@app.train("threshold")
def train_threshold(msg: Message, context: Context) -> Message:
    """Learn tau_i from the LLM's verdicts."""
    return _reply(msg, Node.of(context).train_threshold(protocol.Feedback.unpack(msg.content)).pack())


@app.query("check_peers")
def check_peers(msg: Message, context: Context) -> Message:
    """Score peer answers on the held-out items this client escalates."""
    return _reply(msg, protocol.pack_evidence(Node.of(context).check_peers(protocol.CheckPeers.unpack(msg.content))))


@app.query("route")
def route(msg: Message, context: Context) -> Message:
    """Route the queries under a policy; send the escalated ones."""
    return _reply(msg, Node.of(context).route(protocol.RouteQueries.unpack(msg.content)).pack())


@app.evaluate("score")
def score(msg: Message, context: Context) -> Message:
    """Score the policy's answers: local, peer or the LLM's."""
    return _reply(msg, protocol.metrics_reply(Node.of(context).score(protocol.Feedback.unpack(msg.content))))
