"""Save and load only what trains: `gf.save_trainable` / `gf.load_trainable`.

A fine-tuned model whose rules leave 16 rows of a 32,000-row embedding trainable changes
in those 16 rows only; the file holds them and nothing else, plus a fingerprint of the base
model (every variable's path, dtype and shape, and a SHA-256 of the values that were
frozen) so that loading into the wrong base is refused.

File format (version 1): an uncompressed NumPy ``.npz`` archive (a zip of ``.npy``
arrays), written without pickle and read with ``allow_pickle=False``:

``graphfreeze.json``
    a uint8 array holding UTF-8 JSON::

        {"format": "graphfreeze-trainable", "version": 1, "graphfreeze": "0.1.0",
         "entries": [{"path": "model/emb/embeddings", "dtype": "float32",
                      "shape": [32000, 64], "kind": "rows",
                      "values": "e0.values", "indices": "e0.indices"}, ...],
         "base": {"variables": [["model/emb/embeddings", "float32", [32000, 64]], ...],
                  "frozen_sha256": "<hex>"}}

``e<i>.values``, ``e<i>.indices``
    the trainable entries of one variable. ``kind`` says how to read them:
    ``whole`` (values has the variable's shape; no indices), ``rows`` (indices along axis 0;
    values ``[k, *shape[1:]]``), ``columns`` (indices along the last axis; values
    ``[*shape[:-1], k]``), ``entries`` (flat C-order indices; values ``[k]``). Indices are
    int32 or int64. Values are stored in the variable's dtype, or, for dtypes NumPy does not
    know natively (bfloat16), as unsigned integers of the same width holding the same bits.

``frozen_sha256`` hashes, for every base variable in the listed order, its path (UTF-8),
a NUL byte, and the raw bytes (C order) of its entries that the file does not hold.
Variables are matched by path (Keras ``Variable.path``, a ``tf.Variable``'s name without
``:0``), so build the base with the same layer names as the trained model.

>>> rules = ["*", gf.Unfreeze(gf.Rows("emb/embeddings", new_ids))]   # doctest: +SKIP
>>> gf.save_trainable("tokens.npz", model, *rules)                      # doctest: +SKIP
>>> gf.load_trainable("tokens.npz", fresh_base_model)                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from .dryrun import variable_infos
from .errors import FreezeError
from .rules import Columns, Freeze, Mask, Rows, RuleLike, Unfreeze, as_rule, resolve
from .scale import Scale
from .variables import VariableInfo

__all__ = ["save_trainable", "load_trainable"]

FORMAT, VERSION = "graphfreeze-trainable", 1
HEADER = "graphfreeze.json"
KINDS = ("whole", "rows", "columns", "entries")
_FREEZE_RULES = (Freeze, Rows, Columns, Mask, Unfreeze, Scale)  # Scale: 0 freezes, other factors train


@dataclass
class _Entry:
    """The trainable part of one variable: what the file holds for it."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    values: np.ndarray
    indices: np.ndarray | None = None

    def trainable_mask(self) -> np.ndarray:
        keep = np.zeros(self.shape, dtype=bool)
        if self.kind == "whole":
            keep[...] = True
        elif self.kind == "rows":
            keep[self.indices] = True
        elif self.kind == "columns":
            keep[..., self.indices] = True
        else:
            keep.reshape(-1)[self.indices] = True
        return keep

    def written_into(self, current: np.ndarray) -> np.ndarray:
        """The variable's new value: `current` with these entries written in."""
        if self.kind == "whole":
            return self.values
        new = current.copy()
        if self.kind == "rows":
            new[self.indices] = self.values
        elif self.kind == "columns":
            new[..., self.indices] = self.values
        else:
            new.reshape(-1)[self.indices] = self.values
        return new


# ----------------------------------------------------------------------------- saving


def _model_state(model: Any) -> list[VariableInfo]:
    """The model's weights and statistics (not metrics, not RNG state), each path once."""
    infos = [v for v in variable_infos(model) if v.model_state]
    seen: dict[str, VariableInfo] = {}
    for v in infos:
        if v.path in seen:
            raise FreezeError(f"two variables of {_name(model)} share the path {v.path!r}; "
                              "trainable files match variables by path, so give the layers "
                              "distinct names.")
        seen[v.path] = v
    return infos


def _name(model: Any) -> str:
    return repr(getattr(model, "name", None) or type(model).__name__)


def _index_array(indices: np.ndarray) -> np.ndarray:
    return indices.astype(np.int32 if indices.size == 0 or indices.max() < 2**31 else np.int64)


def _axis_selection(keep: np.ndarray, axis: int) -> np.ndarray | None:
    """The indices along `axis` when `keep` selects whole slices along it, else None."""
    moved = np.moveaxis(keep, axis, 0).reshape(keep.shape[axis], -1)
    whole = moved.all(axis=1)
    return np.flatnonzero(whole) if np.array_equal(moved.any(axis=1), whole) else None


def _entry(info: VariableInfo, value: np.ndarray, keep: np.ndarray) -> _Entry:
    common = {"path": info.path, "dtype": info.dtype.name, "shape": tuple(info.shape)}
    if keep.all():
        return _Entry(kind="whole", values=value, **common)
    if keep.ndim >= 1:
        rows = _axis_selection(keep, 0)
        if rows is not None:
            return _Entry(kind="rows", values=value[rows], indices=_index_array(rows), **common)
        columns = _axis_selection(keep, keep.ndim - 1)
        if columns is not None:
            return _Entry(kind="columns", values=value[..., columns],
                          indices=_index_array(columns), **common)
    flat = np.flatnonzero(keep)
    return _Entry(kind="entries", values=value.reshape(-1)[flat], indices=_index_array(flat), **common)


def _frozen_digest(base: list[tuple[str, np.ndarray, np.ndarray | None]]) -> str:
    """SHA-256 over (path, frozen values) of each base variable; keep None = all frozen."""
    digest = hashlib.sha256()
    for path, value, keep in base:
        digest.update(path.encode() + b"\0")
        frozen = value if keep is None else value[~keep]
        digest.update(np.ascontiguousarray(frozen).tobytes())
    return digest.hexdigest()


def _storable(values: np.ndarray) -> np.ndarray:
    """NumPy-native dtypes as they are; others (bfloat16) as same-width unsigned ints."""
    return values if values.dtype.isbuiltin == 1 else values.view(f"u{values.dtype.itemsize}")


def save_trainable(path: str | os.PathLike[str], model: Any, *rules: RuleLike) -> str:
    """Write what `rules` leave trainable in `model` to `path`; returns the path.

    Whole variables are written whole, variables with frozen rows or columns as indices
    plus values, other partly frozen ones as flat indices plus values; fully frozen ones
    not at all. The file's size is proportional to the trainable entries (see the module
    docstring for the format). Rules that are not freeze rules (learning-rate factors) are
    ignored. The file is written to a temporary name next to `path` and renamed, so a
    failure never leaves a partial file.

    >>> gf.save_trainable("head.npz", model, "*", gf.Unfreeze("head/*"))   # doctest: +SKIP
    """
    target = os.fspath(path)
    infos = _model_state(model)
    freeze_rules = [r for r in (as_rule(r) for r in rules) if isinstance(r, _FREEZE_RULES)]
    frozen = {id(vf.variable): vf.frozen for vf in resolve(freeze_rules, infos)} if freeze_rules else {}
    entries: list[_Entry] = []
    base: list[tuple[str, np.ndarray, np.ndarray | None]] = []
    for info in infos:
        value = np.asarray(info.variable.numpy())
        keep = ~frozen[id(info)] if id(info) in frozen else np.ones(info.shape, dtype=bool)
        base.append((info.path, value, keep))
        if keep.any():
            entries.append(_entry(info, value, keep))
    header: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "graphfreeze": _version(),
        "entries": [], "base": {
            "variables": [[v.path, v.dtype.name, list(v.shape)] for v in infos],
            "frozen_sha256": _frozen_digest(base)}}
    arrays: dict[str, np.ndarray] = {}
    for i, e in enumerate(entries):
        record = {"path": e.path, "dtype": e.dtype, "shape": list(e.shape), "kind": e.kind,
                  "values": f"e{i}.values"}
        arrays[f"e{i}.values"] = _storable(np.ascontiguousarray(e.values))
        if e.indices is not None:
            record["indices"] = f"e{i}.indices"
            arrays[f"e{i}.indices"] = e.indices
        header["entries"].append(record)
    arrays[HEADER] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    _write_atomically(target, arrays)
    return target


def _version() -> str:
    from . import __version__
    return __version__


def _write_atomically(target: str, arrays: dict[str, np.ndarray]) -> None:
    directory = os.path.dirname(os.path.abspath(target))
    try:
        fd, temporary = tempfile.mkstemp(prefix=".graphfreeze-", suffix=".tmp", dir=directory)
    except OSError as e:
        raise FreezeError(f"cannot write {target!r}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # keys name arrays, never allow_pickle
        os.replace(temporary, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(e, OSError):
            raise FreezeError(f"cannot write {target!r}: {e.strerror or e}") from None
        raise


# ----------------------------------------------------------------------------- loading


class _File:
    """A trainable file, read and checked for internal consistency (not yet against a model)."""

    def __init__(self, path: str):
        self.path = path
        arrays = self._read(path)
        if HEADER not in arrays:
            raise self.error(f"has no {HEADER} header; it was not written by gf.save_trainable")
        try:
            header = json.loads(arrays.pop(HEADER).astype(np.uint8).tobytes().decode())
        except (ValueError, UnicodeDecodeError) as e:
            raise self.error(f"has an unreadable header ({e})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise self.error("is not a graphfreeze trainable file (wrong format tag)")
        if header.get("version") != VERSION:
            raise self.error(f"has format version {header.get('version')!r}; this graphfreeze "
                             f"reads version {VERSION}")
        self.entries = [self._entry(record, arrays) for record in self._list(header, "entries")]
        base = header.get("base")
        if not isinstance(base, dict):
            raise self.error("has no base fingerprint")
        self.base_variables = [self._base_variable(v) for v in self._list(base, "variables")]
        self.base_digest = base.get("frozen_sha256")

    def _read(self, path: str) -> dict[str, np.ndarray]:
        try:
            archive = np.load(path, allow_pickle=False)  # never unpickle
        except FileNotFoundError:
            raise FreezeError(f"no such trainable file: {path!r}") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise self.error(f"cannot be read as a NumPy .npz archive ({type(e).__name__}: {e})") \
                from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise self.error("holds a single array, not an .npz archive written by gf.save_trainable")
        try:
            with archive:
                return {name: archive[name] for name in archive.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise self.error(f"is damaged ({type(e).__name__}: {e})") from None

    def error(self, what: str) -> FreezeError:
        return FreezeError(f"trainable file {self.path!r} {what}; nothing was loaded.")

    def _list(self, record: dict[str, Any], key: str) -> list[Any]:
        value = record.get(key)
        if not isinstance(value, list):
            raise self.error(f"has a malformed header (no list {key!r})")
        return value

    def _base_variable(self, item: Any) -> tuple[str, str, tuple[int, ...]]:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                and isinstance(item[1], str) and _is_shape(item[2])):
            raise self.error(f"has a malformed base variable {item!r}")
        return item[0], item[1], tuple(item[2])

    def _entry(self, record: Any, arrays: dict[str, np.ndarray]) -> _Entry:
        if not isinstance(record, dict) or not isinstance(record.get("path"), str) \
                or record.get("kind") not in KINDS or not _is_shape(record.get("shape")) \
                or not isinstance(record.get("dtype"), str):
            raise self.error(f"has a malformed entry {record!r}")
        path, kind, shape = record["path"], record["kind"], tuple(record["shape"])
        where = f"entry for {path!r}"
        try:
            dtype = np.dtype(tf.as_dtype(record["dtype"]).as_numpy_dtype)
        except (TypeError, ValueError):
            raise self.error(f"{where} has an unknown dtype {record['dtype']!r}") from None
        values = self._array(arrays, record.get("values"), where)
        stored = dtype if dtype.isbuiltin == 1 else np.dtype(f"u{dtype.itemsize}")
        if values.dtype != stored:
            raise self.error(f"{where} holds {values.dtype} values for a {record['dtype']} variable")
        values = values.view(dtype)
        indices = None
        if kind != "whole":
            indices = self._array(arrays, record.get("indices"), where)
            if not shape or indices.ndim != 1 or indices.dtype not in (np.int32, np.int64):
                raise self.error(f"{where} has malformed {kind} indices")
            length = {"rows": shape[0], "columns": shape[-1], "entries": int(np.prod(shape))}[kind]
            if indices.size and (indices.min() < 0 or indices.max() >= length):
                raise self.error(f"{where} has {kind} indices outside 0..{length - 1}")
            if np.unique(indices).size != indices.size:
                raise self.error(f"{where} repeats a {kind} index")
        k = 0 if indices is None else indices.size
        expected = {"whole": shape, "rows": (k, *shape[1:]), "columns": (*shape[:-1], k),
                    "entries": (k,)}[kind]
        if values.shape != expected:
            raise self.error(f"{where} has values of shape {list(values.shape)}, expected "
                             f"{list(expected)} for its {kind}")
        return _Entry(path, record["dtype"], shape, kind, values, indices)

    def _array(self, arrays: dict[str, np.ndarray], name: Any, where: str) -> np.ndarray:
        if not isinstance(name, str) or name not in arrays:
            raise self.error(f"{where} names a missing array {name!r}")
        return arrays[name]


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(d, int) and d >= 0 for d in value)


def load_trainable(path: str | os.PathLike[str], model: Any, *, check_base: bool = True) -> list[str]:
    """Write the entries a `save_trainable` file holds into `model`; returns the paths of
    the variables written.

    Everything is checked before anything is written: a variable of the file missing from
    the model, a shape or dtype mismatch, a base model that differs from the one the file
    was saved from (other variables, or other frozen values) unless `check_base=False`, or a
    corrupted or foreign file raises `FreezeError` naming the variable or file, and the
    model is left untouched.

    >>> gf.load_trainable("tokens.npz", base_model)                       # doctest: +SKIP
    """
    source = os.fspath(path)
    file = _File(source)
    by_path = {v.path: v for v in variable_infos(model)}
    for e in file.entries:
        info = by_path.get(e.path)
        if info is None:
            raise FreezeError(f"trainable file {source!r} holds {e.path!r}, which {_name(model)} "
                              f"does not have{_closest(e.path, by_path)}; nothing was loaded.")
        if tuple(info.shape) != e.shape or info.dtype.name != e.dtype:
            raise FreezeError(
                f"trainable file {source!r} holds {e.path!r} as {e.dtype} {list(e.shape)}, but "
                f"in {_name(model)} it is {info.dtype.name} {list(info.shape)}; nothing was loaded.")
    current = {e.path: np.asarray(by_path[e.path].variable.numpy()) for e in file.entries}
    if check_base:
        _check_base(file, model, by_path, current)
    new_values = [(by_path[e.path].variable, e.written_into(current[e.path])) for e in file.entries]
    for variable, value in new_values:
        variable.assign(value)
    return [e.path for e in file.entries]


def _closest(path: str, paths: Iterable[str]) -> str:
    import difflib
    close = difflib.get_close_matches(path, list(paths), n=3, cutoff=0.5)
    return f" (closest: {', '.join(repr(p) for p in close)})" if close else ""


def _check_base(file: _File, model: Any, by_path: dict[str, VariableInfo],
                current: dict[str, np.ndarray]) -> None:
    hint = "; pass check_base=False to load into a different base model. Nothing was loaded."
    model_state = {v.path: v for v in _model_state(model)}
    listed = {p for p, _, _ in file.base_variables}
    for p, dtype, shape in file.base_variables:
        info = model_state.get(p)
        if info is None:
            raise FreezeError(f"{_name(model)} is not the base {file.path!r} was saved from: it "
                              f"has no variable {p!r}{_closest(p, model_state)}{hint}")
        if (info.dtype.name, tuple(info.shape)) != (dtype, shape):
            raise FreezeError(f"{_name(model)} is not the base {file.path!r} was saved from: "
                              f"{p!r} is {info.dtype.name} {list(info.shape)} there but was "
                              f"{dtype} {list(shape)}{hint}")
    extra = [p for p in model_state if p not in listed]
    if extra:
        raise FreezeError(f"{_name(model)} is not the base {file.path!r} was saved from: it has "
                          f"variable {extra[0]!r}, which the base did not{hint}")
    keeps = {e.path: e.trainable_mask() for e in file.entries}
    base = [(p, current[p] if p in current else np.asarray(model_state[p].variable.numpy()),
             keeps.get(p)) for p, _, _ in file.base_variables]
    if _frozen_digest(base) != file.base_digest:
        raise FreezeError(f"{_name(model)} is not the base {file.path!r} was saved from: its "
                          f"frozen values differ (a different initialisation or checkpoint){hint}")
