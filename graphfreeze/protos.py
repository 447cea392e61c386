"""TensorFlow protos the IR reads and writes: input strings, attr values, constant tensors,
colocation hints, and the dtypes and shapes a GraphDef alone does not carry."""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2, tensor_pb2


def parse_input(text: str) -> tuple[str, int, bool]:
    """'name', 'name:3' or '^name' -> (node, output, is_control)."""
    if text.startswith("^"):
        return text[1:], -1, True
    name, sep, idx = text.rpartition(":")
    if sep and idx.isdigit():
        return name, int(idx), False
    return text, 0, False


def graph_meta(graph: Any) -> dict[str, tuple[list, list]]:
    """node name -> (output dtypes, output shapes) of a traced graph, for `IR.from_graph_def`
    (a GraphDef alone does not carry them)."""
    def shape(t: Any) -> tuple | None:
        return None if t.shape.rank is None else tuple(t.shape.as_list())
    return {op.name: ([t.dtype.as_datatype_enum for t in op.outputs], [shape(t) for t in op.outputs])
            for op in graph.get_operations()}


def tensor_proto(value: np.ndarray, dtype: tf.DType) -> Any:
    """A TensorProto holding `value` as raw bytes. `tf.make_tensor_proto` appends bools
    one Python object at a time (a minute for 12M entries); a mask of 512M must not."""
    if dtype == tf.bool or value.size > 1024 and dtype.is_numpy_compatible and \
            dtype not in (tf.string, tf.resource, tf.variant):
        return tensor_pb2.TensorProto(
            dtype=dtype.as_datatype_enum, tensor_shape=tf.TensorShape(value.shape).as_proto(),
            tensor_content=np.ascontiguousarray(value, dtype=dtype.as_numpy_dtype).tobytes())
    return tf.make_tensor_proto(value, dtype=dtype)


def attr_value(value: Any) -> Any:
    if isinstance(value, attr_value_pb2.AttrValue):
        return value
    if isinstance(value, tf.DType):
        return attr_value_pb2.AttrValue(type=value.as_datatype_enum)
    if isinstance(value, bool):
        return attr_value_pb2.AttrValue(b=value)
    if isinstance(value, int):
        return attr_value_pb2.AttrValue(i=value)
    if isinstance(value, str):
        return attr_value_pb2.AttrValue(s=value.encode())
    if hasattr(value, "dtype") and hasattr(value, "tensor_shape"):  # TensorProto
        return attr_value_pb2.AttrValue(tensor=value)
    raise TypeError(f"unsupported attr value {value!r}")


def drop_missing_colocations(nd: Any, graph: nx.MultiDiGraph) -> None:
    """Colocation hints that name removed nodes would make the importer fail."""
    keep = [s for s in nd.attr["_class"].list.s
            if not s.startswith(b"loc:@") or s[5:].decode() in graph]
    if keep:
        del nd.attr["_class"].list.s[:]
        nd.attr["_class"].list.s.extend(keep)
    else:
        del nd.attr["_class"]
