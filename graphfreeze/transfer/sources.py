"""Where the source model comes from: a model, a ``.keras`` file, ``.weights.h5`` weights or a
TensorFlow checkpoint (with an architecture); loaded and validated before any target
weight changes."""

from __future__ import annotations

import glob
import os
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..variables import resource_variable
from .results import Architecture, SourceLike, TransferError


def _as_model(obj: Any, what: str) -> keras.Model:
    if isinstance(obj, keras.Model):
        return obj
    raise TransferError(f"{what} must be a Keras model, got {type(obj).__name__} {obj!r}; "
                        "wrap a single layer in keras.Sequential([keras.Input(...), layer]).")


def _built(model: keras.Model, example_inputs: Any, what: str) -> keras.Model:
    if model.built and model.variables:
        return model
    if model.built or example_inputs is None:
        raise TransferError(f"{what} {model.name!r} has no variables yet; build it (give it a "
                            "keras.Input or call it once) or pass example_inputs=.")
    try:
        model(tf.nest.map_structure(tf.convert_to_tensor, example_inputs))
    except Exception as e:
        raise TransferError(f"building {what} {model.name!r} by calling it on example_inputs "
                            f"failed with {type(e).__name__}: {e}") from e
    return model


def _architecture(architecture: Architecture | None, path: str, kind: str,
                  example_inputs: Any) -> keras.Model:
    if architecture is None:
        raise TransferError(
            f"{path} is a {kind}: it holds weights but no dataflow graph to match layers on. "
            "Pass architecture= (the model that saved it, or a zero-argument function that "
            "builds it); the weights are loaded into it and its graph is matched against the "
            "target. Or save the full model with model.save('model.keras').")
    arch = architecture
    if not isinstance(architecture, keras.Model) and callable(architecture):
        try:
            arch = architecture()
        except Exception as e:
            raise TransferError(f"architecture() raised {type(e).__name__}: {e}; it must build "
                                f"the model that wrote {path}.") from e
    return _built(_as_model(arch, "architecture (or what it returns)"), example_inputs, "architecture")


def _load_weights_h5(path: str, arch: keras.Model) -> None:
    backup = _snapshot(arch)
    try:
        arch.load_weights(path)
    except Exception as e:
        _restore(arch, backup)
        raise TransferError(f"cannot load the weights file {path} into architecture "
                            f"{arch.name!r}: {e}. The architecture must be the one that saved "
                            "the file (model.save_weights).") from e


def _snapshot(model: keras.Model) -> list[np.ndarray]:
    return [np.array(v.numpy(), copy=True) for v in model.variables]


def _restore(model: keras.Model, values: list[np.ndarray]) -> None:
    for v, value in zip(model.variables, values):
        v.assign(value)


def _checkpoint_prefix(path: str) -> str:
    if path.endswith(".index"):
        return path[: -len(".index")]
    if not os.path.isdir(path):
        return path
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        raise TransferError(f"{path} is a SavedModel, which transfer does not read: it may hold no "
                            "Keras layers. Load the model yourself and pass it as the source, or "
                            "save it as a .keras file.")
    latest = tf.train.latest_checkpoint(path)
    if latest:
        return latest
    indexes = sorted(glob.glob(os.path.join(path, "*.index")))
    if len(indexes) == 1:   # written by Checkpoint.write(), which keeps no state file
        return indexes[0][: -len(".index")]
    raise TransferError(f"{path} is a directory without a checkpoint: no 'checkpoint' state file "
                        f"and {len(indexes)} '*.index' files. Pass the checkpoint prefix (e.g. "
                        f"{os.path.join(path, 'ckpt-1')}).")


def _checkpoint_children(prefix: str) -> list[str]:
    from tensorflow.core.protobuf import trackable_object_graph_pb2
    try:
        reader = tf.train.load_checkpoint(prefix)
        proto = trackable_object_graph_pb2.TrackableObjectGraph()
        proto.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    except Exception as e:
        raise TransferError(f"cannot read the checkpoint {prefix}: {type(e).__name__}: {e}. "
                            "Pass a directory written by tf.train.Checkpoint.save / "
                            "CheckpointManager, or a checkpoint prefix.") from e
    return [c.local_name for c in proto.nodes[0].children]


def _unmatched_variables(status: Any, arch: keras.Model) -> list[str] | None:
    objects = getattr(getattr(status, "_checkpoint", None), "object_by_proto_id", None)
    if objects is None:
        return None
    matched = {id(o) for o in objects.values()}
    return [v.path for v in arch.variables
            if id(v) not in matched and id(resource_variable(v)) not in matched]


def _try_restore(prefix: str, arch: keras.Model, child: str | None) -> tuple[int, str, str] | None:
    """None if the checkpoint object `child` (None: the root) holds every variable of `arch`;
    else (how many are missing, where, which)."""
    where = "the checkpoint root" if child is None else f"{child!r}"
    try:
        ckpt = tf.train.Checkpoint(root=arch) if child is None else tf.train.Checkpoint(**{child: arch})
        status = ckpt.read(prefix)
        status.expect_partial()
        status.assert_existing_objects_matched()
    except AssertionError as e:
        missing = _unmatched_variables(status, arch)
        if missing:
            return len(missing), where, ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        return len(arch.variables), where, str(e).splitlines()[0]
    except (ValueError, AttributeError, tf.errors.OpError) as e:   # a shape that differs
        return len(arch.variables), where, str(e).splitlines()[0]
    return None


def _load_checkpoint(path: str, arch: keras.Model) -> None:
    """Restore `arch` from the checkpoint object that holds all of its variables: the child
    saved as ``model=`` first, then every other child, then the root."""
    prefix = _checkpoint_prefix(path)
    children = _checkpoint_children(prefix)
    backup = _snapshot(arch)
    failures = []
    candidates = sorted((c for c in children if c != "save_counter"), key=lambda c: c != "model")
    for child in [*candidates, None]:
        failure = _try_restore(prefix, arch, child)
        if failure is None:
            return
        _restore(arch, backup)
        failures.append(failure)
    count, where, detail = min(failures)
    raise TransferError(
        f"checkpoint {prefix} is missing variables of architecture {arch.name!r}: the closest "
        f"match ({where}) leaves {count} of {len(arch.variables)} variable(s) without a value: "
        f"{detail}. "
        f"Objects at the checkpoint root: {children}. Pass the architecture that wrote it.")


def _resolve_source(source: SourceLike, architecture: Architecture | None,
                    example_inputs: Any) -> tuple[keras.Model, str]:
    """The source as a model with weights, and how to name it in messages."""
    if isinstance(source, keras.Model):
        return _built(source, example_inputs, "source model"), f"model {source.name!r}"
    if not isinstance(source, (str, os.PathLike)):
        raise TransferError(f"source must be a Keras model, a .keras / .weights.h5 file or a "
                            f"tf.train.Checkpoint directory, got {type(source).__name__} {source!r}.")
    path = os.fspath(source)
    checkpoint = os.path.isdir(path) or path.endswith(".index") or os.path.exists(path + ".index")
    if not checkpoint and not os.path.exists(path):
        raise TransferError(f"source file {path} does not exist.")
    if checkpoint:
        arch = _architecture(architecture, path, "tf.train.Checkpoint", example_inputs)
        _load_checkpoint(path, arch)
        return arch, f"checkpoint {path} (architecture {arch.name!r})"
    if path.endswith(".weights.h5"):
        arch = _architecture(architecture, path, "weights-only file", example_inputs)
        _load_weights_h5(path, arch)
        return arch, f"weights {path} (architecture {arch.name!r})"
    if path.endswith((".keras", ".h5", ".hdf5")):
        return _load_model(path), f"file {path}"
    raise TransferError(f"source {path} is not a file type transfer reads: expected a .keras "
                        "model, a .weights.h5 file (with architecture=), or a tf.train.Checkpoint "
                        "directory or prefix (with architecture=).")


def _load_model(path: str) -> keras.Model:
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:
        raise TransferError(f"cannot load the model file {path}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}. A .keras file is "
                            "written by model.save('name.keras'); a .weights.h5 file needs "
                            "architecture=.") from e
    return _as_model(model, f"the object saved in {path}")
