"""Transfer: find the layers two Keras models have in common, copy their weights, freeze them.

Seed 003 (several architectures share early layers) and seed 001 (reuse a saved network's
lower layers). Layers are matched on the models' dataflow graphs, never on names:

1. Each model becomes a networkx ``MultiDiGraph`` of *call sites*: one node per layer call,
   an edge ``producer -> consumer`` keyed by the consumer's input position and carrying the
   producer's output index; the model inputs are roots ``input:0``, ``input:1``...
   Functional and Sequential models use their Keras layer graph, with nested functional
   models expanded in place. A model without one (subclassed) is traced with
   ``tf.function`` while ``Layer.__call__`` is recorded: calls of layers that are not models
   become the nodes (models are expanded, as above), and the TensorFlow ops between them
   (``x + shortcut``, ``tf.nn.relu`` written in ``call``) become weightless nodes of kind
   ``tf.<OpType>``, so they take part in the structure too. When either model needs
   tracing, both are traced, so the two graphs are always built the same way.
2. The target graph is walked in topological order. A target node matches a source node
   when every inbound node is already matched to the source node's inbound node in the same
   input position, and the two have the same layer class, the same configuration that
   matters and the same variable names, shapes and dtypes. The result is the largest common
   prefix from the inputs, extended through branches exactly where both graphs agree; the
   first difference stops the match for everything downstream.
3. A layer is transferred when all of its call sites matched call sites of one source layer.
   Weightless layers must match for the walk to pass through them, but only layers with
   weights are reported as pairs and returned as rules.

"Configuration that matters" is ``get_config()`` without what changes only starting values
or training behaviour: ``name``, ``trainable``, ``dtype``, ``seed``, ``*_initializer``,
``*_regularizer``, ``*_constraint``, ``momentum``, ``dropout``, ``recurrent_dropout``,
``unit_forget_bias``, ``quantization_config``; noise layers (``*Dropout``, ``*Noise``) are
the identity at inference, so only their class must agree.

Why the trace records layer calls instead of reading name scopes: inside a trace TensorFlow
uniquifies name scopes (the layer ``a`` may run under ``a_1/``, which is also the scope
another layer named ``a_1`` would get), and weightless layers have no ``ReadVariableOp`` to
locate them by.

>>> rules = gf.transfer("pretrained.keras", new_model)          # doctest: +SKIP
>>> print(rules)                                                 # doctest: +SKIP
>>> step = gf.freeze(*rules)(train_step)                         # doctest: +SKIP
"""

from __future__ import annotations

from .api import match_layers, transfer, transfer_report
from .results import LayerPair, MatchReport, TransferError, Transferred, Unmatched

__all__ = ["TransferError", "LayerPair", "Unmatched", "MatchReport", "Transferred",
           "match_layers", "transfer", "transfer_report"]
