"""Issue 14 item 5: bytes of gradient and optimizer temporaries per step, read from the
graph's shapes, with the sliced rewrite against the rewrite without slicing and the peers.

For every partly frozen variable V, its *chain* is the set of ops of the step (as emitted,
so TensorFlow's own shape inference gives every output shape) that feed a write to V or to
one of V's optimizer slots, but feed neither the step's outputs (the loss) nor a write to any
other variable or slot: its weight-gradient product and its optimizer update, not the
activation gradients it shares with the layers below. The figure is the sum over the chains
of the outputs' bytes (each tensor once; constants, allocated once, resource handles and
reads that alias the variable's buffer, after a DisableCopyOnRead, not counted), and how
many of those tensors have a chained variable's full shape.

Models: trainable tokens (bench_tokens.py: 16 of 32,000 rows of a tied 32,000 x 512 table,
AdamW) and the seed-000 grow case (bench_partial.py: 8 layers of 1024+64, Adam). Contenders:
graphfreeze as shipped; graphfreeze with `slice_updates` (and the sliced products it calls)
left out of the pipeline, i.e. masked full-size gradients and guarded full-size updates; the
peer program (hand-written split / seed-002 mask trick); training everything. Before the
figures are taken, two steps of each frozen contender must train the same values.

    python bench/bench_temporaries.py [--quick]
"""

from __future__ import annotations

import contextlib
import sys

import common
import keras
import numpy as np
import tensorflow as tf

import graphfreeze as gf
import graphfreeze.passes as passes
from graphfreeze.passes.slice_updates import slice_updates

WRITES = ("AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp")
WRITE_PREFIXES = ("ResourceScatter", "ResourceApply", "ResourceSparseApply")


@contextlib.contextmanager
def slicing_off():
    """The training pipeline without `slice_updates`, for rewrites made inside the block."""
    saved = passes.TRAINING_PIPELINE
    passes.TRAINING_PIPELINE = tuple(p for p in saved if p is not slice_updates)
    try:
        yield
    finally:
        passes.TRAINING_PIPELINE = saved


def handle(variable) -> tf.Tensor:
    return variable.handle if hasattr(variable, "handle") else variable.value.handle


def slot_groups(variables: dict[str, object], optimizer) -> dict[str, list]:
    """Each variable with its optimizer slots (Keras names a slot after its variable's path)."""
    groups = {name: [v] for name, v in variables.items()}
    for slot in optimizer.variables:
        owners = [name for name, v in variables.items()
                  if tuple(slot.shape) == tuple(v.shape)
                  and getattr(v, "path", v.name.split(":")[0]).replace("/", "_") in slot.path]
        if len(owners) == 1:
            groups[owners[0]].append(slot)
    return groups


def _bytes(t: tf.Tensor) -> int:
    if t.dtype in (tf.resource, tf.variant) or not t.shape.is_fully_defined():
        return 0
    return int(np.prod(t.shape.as_list(), dtype=np.int64)) * t.dtype.size


def _aliases(op) -> bool:
    """A read after a DisableCopyOnRead shares the variable's buffer: it allocates nothing."""
    return op.type == "ReadVariableOp" and any(c.type == "DisableCopyOnRead"
                                               for c in op.control_inputs)


def chain_bytes(concrete, groups: dict[str, list], of: list[str],
                full: set | None = None) -> dict[str, object]:
    """Bytes and ops of the chains of the variables named in `of` (see the module doc);
    `full`: the shapes counted as full-size (default: those of the variables in `of`)."""
    # Adam and AdamW: each variable with its two slots, else a chain would be mistaken
    assert all(len(groups[name]) == 3 for name in of), {n: len(groups[n]) for n in of}
    graph = concrete.graph
    inner = {id(ext): internal for ext, internal in graph.captures}
    owner = {}  # internal resource placeholder op -> group name
    for name, members in groups.items():
        for v in members:
            placeholder = inner.get(id(handle(v)))
            if placeholder is not None:
                owner[placeholder.op.name] = name
    writes: dict[str, list] = {}
    for op in graph.get_operations():
        if op.type in WRITES or op.type.startswith(WRITE_PREFIXES):
            src = op.inputs[0].op
            while src.type == "Identity":
                src = src.inputs[0].op
            writes.setdefault(owner.get(src.name, "?" + src.name), []).append(op)

    def ancestors(roots) -> set:
        seen, stack = set(), list(roots)
        while stack:
            op = stack.pop()
            if op.name in seen:
                continue
            seen.add(op.name)
            stack += [t.op for t in op.inputs]  # data only: auto control deps tie everything
        return seen

    ops = {op.name: op for op in graph.get_operations()}
    loss = ancestors([t.op for t in graph.outputs])
    feeds = {name: ancestors(w) for name, w in writes.items()}
    full_shapes = full or {tuple(v.shape) for name in of for v in groups[name][:1]}
    chained, total, largest, full_size = set(), 0, 0, 0
    for name in of:
        others = set().union(*(a for n, a in feeds.items() if n != name), loss)
        chained |= feeds.get(name, set()) - others
    chained = {n for n in chained if ops[n].type not in ("Const", "Placeholder")}
    for n in chained:
        if _aliases(ops[n]):
            continue
        for t in ops[n].outputs:
            total += _bytes(t)
            largest = max(largest, _bytes(t))
            full_size += t.shape.rank is not None and tuple(t.shape.as_list()) in full_shapes
    missing = [name for name in of if name not in writes]
    return {"bytes": total, "ops": len(chained), "largest_tensor_bytes": largest,
            "variable_sized_tensors": int(full_size),
            "variables_without_writes": missing}


# ----------------------------------------------------------------------------- models

def tokens(quick: bool) -> dict:
    import bench_tokens as bt
    vocab, width, hidden, batch, seq, n_new = ((4000, 128, 512, 4, 32, 16) if quick
                                               else (32000, 512, 2048, 8, 64, 16))
    init = bt.weights(vocab, width, hidden)
    rng = np.random.default_rng(1)
    new_rows = np.arange(vocab - n_new, vocab)
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    ids[:, ::4] = rng.choice(new_rows, ids[:, ::4].shape)
    labels = rng.integers(0, vocab, (batch, seq)).astype(np.int32)

    def frozen_step():
        fn, w = bt.full_step(init)
        step = gf.freeze("*", gf.Unfreeze(gf.Rows(w["table"], new_rows)))(tf.function(fn))
        return step, w, fn

    sliced, w_on, fn_on = frozen_step()
    unsliced, w_off, fn_off = frozen_step()
    split, new = bt.split_step(init, n_new)
    split = tf.function(split)
    everything, w_all = bt.full_step(init)
    everything = tf.function(everything)
    with slicing_off():
        unsliced(ids, labels)
    sliced(ids, labels)
    split(ids, labels)
    everything(ids, labels)
    sliced(ids, labels), unsliced(ids, labels), split(ids, labels)

    # the same training: both rewrites equal the hand-written program's rows, frozen rows stay
    for w in (w_on, w_off):
        np.testing.assert_allclose(w["table"].numpy()[vocab - n_new:], new.numpy(), atol=1e-6)
        np.testing.assert_array_equal(w["table"].numpy()[: vocab - n_new], init["table"][: vocab - n_new])

    def optimizer_of(fn):  # the step closes over its AdamW
        return next(c.cell_contents for c in fn.__closure__
                    if isinstance(c.cell_contents, keras.optimizers.Optimizer))

    out = {}
    for label, concrete, w, fn in (
            ("graphfreeze (sliced)", sliced.rewritten(ids, labels).concrete_function, w_on, fn_on),
            ("graphfreeze, slice_updates off", unsliced.rewritten(ids, labels).concrete_function,
             w_off, fn_off)):
        out[label] = chain_bytes(concrete, slot_groups(w, optimizer_of(fn)), ["table"])
    split_cf = split.get_concrete_function(ids, labels)
    out["hand-written split program"] = chain_bytes(
        split_cf, slot_groups({"new_rows": new}, optimizer_of(split.python_function)), ["new_rows"],
        full={(vocab, width)})
    all_cf = everything.get_concrete_function(ids, labels)
    out["train everything"] = chain_bytes(
        all_cf, slot_groups(w_all, optimizer_of(everything.python_function)), ["table"])
    return {"config": {"vocab": vocab, "width": width, "hidden": hidden, "batch": batch,
                       "sequence": seq, "trainable_rows": n_new, "optimizer": "AdamW"},
            "chains_of": ["table"], "contenders": out}


def grow(quick: bool) -> dict:
    import bench_partial as bp
    old, new, depth, batch, classes = (256, 16, 8, 64, 10) if quick else (1024, 64, 8, 256, 10)
    x = np.random.default_rng(0).normal(size=(batch, old)).astype("float32")
    y = np.random.default_rng(1).integers(0, classes, size=(batch,)).astype("int32")
    masks = bp.grown_masks(old, new, old, depth, classes)
    partly = [f"{n}/{k}" for n in masks for k in ("kernel", "bias") if n != "out" or k == "kernel"]

    def contender(masked=False):
        model = bp.network(old, old + new, depth, classes, masks=masks if masked else None)
        optimizer = keras.optimizers.Adam(1e-3)
        return model, optimizer, tf.function(common.train_step(model, optimizer))

    def groups(model, optimizer):
        return slot_groups({"/".join(v.path.split("/")[-2:]): v
                            for v in model.trainable_variables}, optimizer)

    m_on, o_on, s_on = contender()
    m_off, o_off, s_off = contender()
    m_mask, o_mask, s_mask = contender(masked=True)
    m_all, o_all, s_all = contender()
    for m in (m_off, m_mask, m_all):
        m.set_weights(m_on.get_weights())
    sliced = gf.freeze(*bp.grown_rules(old, new, depth))(s_on)
    unsliced = gf.freeze(*bp.grown_rules(old, new, depth))(s_off)
    with slicing_off():
        unsliced(x, y)
    sliced(x, y), s_mask(x, y), s_all(x, y)
    sliced(x, y), unsliced(x, y), s_mask(x, y)
    for m in (m_on, m_off):
        for a, b in zip(m.get_weights(), m_mask.get_weights()):
            np.testing.assert_allclose(a, b, atol=2e-5)
    out = {
        "graphfreeze (sliced)": chain_bytes(sliced.rewritten(x, y).concrete_function,
                                            groups(m_on, o_on), partly),
        "graphfreeze, slice_updates off": chain_bytes(unsliced.rewritten(x, y).concrete_function,
                                                      groups(m_off, o_off), partly),
        "seed-002 mask trick": chain_bytes(s_mask.get_concrete_function(x, y),
                                           groups(m_mask, o_mask), partly),
        "train everything": chain_bytes(s_all.get_concrete_function(x, y),
                                        groups(m_all, o_all), partly),
    }
    frozen = sum(int(k.sum() + b.sum()) for k, b in masks.values())
    return {"config": {"old_units": old, "new_units": new, "depth": depth, "batch": batch,
                       "optimizer": "Adam", "frozen_parameters": frozen,
                       "parameters": sum(k.size + b.size for k, b in masks.values())},
            "chains_of": partly, "contenders": out}


def main(argv=None) -> int:
    args = common.arguments(__doc__, rounds=1).parse_args(argv)
    results = {"tokens": tokens(args.quick), "grow": grow(args.quick)}
    for model, r in results.items():
        ref = r["contenders"]["graphfreeze, slice_updates off"]["bytes"]
        for c in r["contenders"].values():
            c["ratio_vs_unsliced"] = c["bytes"] / ref
            assert not c["variables_without_writes"], c
        print(common.table(f"{model}: gradient and optimizer temporaries of the partly frozen "
                           "variables, per step", [
                               (k, f"{c['bytes'] / 2**20:.2f}", str(c["ops"]),
                                str(c["variable_sized_tensors"]),
                                f"{c['largest_tensor_bytes'] / 2**20:.2f}",
                                f"{c['ratio_vs_unsliced']:.3f}")
                               for k, c in r["contenders"].items()],
                           ("contender", "MiB", "ops", "variable-sized", "largest MiB", "x slicing off")))
        print()
    path = common.write_json("temporaries" + ("_quick" if args.quick else ""), {
        "models": results,
        "command": "python bench/bench_temporaries.py " + " ".join(argv or sys.argv[1:])})
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
