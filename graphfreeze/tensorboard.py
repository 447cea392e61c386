"""Write graphs where TensorBoard's graph dashboard finds them."""

from __future__ import annotations

import os
from typing import Any

import tensorflow as tf


def write_graph(graph_def: Any, logdir: str) -> str:
    """One event file holding `graph_def` under `logdir`; returns the directory."""
    os.makedirs(logdir, exist_ok=True)
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        tf.summary.graph(graph_def)
    writer.flush()
    writer.close()
    return logdir
