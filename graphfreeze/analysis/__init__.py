"""Analyses of a traced program: they read it and never edit it.

* dependence.py: which variables' gradients (and which variables' values) each tensor
  carries, the basis for recognising optimizer state and for pruning it;
* state_roles.py: which captured variables the step uses as optimizer state, read off what
  the graph does rather than from names;
* refusals.py: what the rewrite cannot see into (opaque ops, writes without a marked
  gradient, custom gradients in forward mode), refused by name before anything is edited;
* frontier.py: where the frozen prefix of a rewritten training step ends (for the cache).

Passes (graphfreeze/passes/) edit; they read these results through the `Plan`.
"""
