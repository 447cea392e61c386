"""Optimizer memory: what each contender keeps in optimizer state, and its process memory.

Two models, three contenders each, the same custom Adam(W) step:

* ResNet50 (`weights=None`, 64x64 inputs, 10 classes), head only:
  graphfreeze `gf.freeze("*", gf.Unfreeze("predictions/*"))`, Keras `trainable=False` on
  every layer but `predictions`, and training everything;
* the trainable-tokens model of bench_tokens.py (32,000 x 512 tied table, 16 trainable
  rows): graphfreeze `gf.freeze("*", gf.Unfreeze(gf.Rows(table, rows)))`, the hand-written
  split program (only the 16 rows are a variable the optimizer sees: what `trainable=False`
  cannot express for rows), and training everything.

Optimizer-state bytes are the sizes of `optimizer.variables` after the first step (slots
plus counters), measured for all contenders side by side in one process. Peak RSS is
measured per contender in a fresh subprocess (the same script with `--contender`): in one
process the peak would be the largest contender's, whichever ran; each subprocess reports
its peak (VmHWM, tracing and rewriting included) and its RSS after the steps.

    python bench/bench_memory.py [--steps 3] [--quick]
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import common
import keras
import numpy as np
import tensorflow as tf
from bench_tokens import full_step, split_step, weights

import graphfreeze as gf

MIB = 2 ** 20


def state_bytes(optimizer) -> int:
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in optimizer.variables)


def resnet(contender: str, quick: bool):
    """(step, optimizer, args) for one ResNet50 contender."""
    size = 32 if quick else 64
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classes=10)
    optimizer = keras.optimizers.Adam(1e-3)
    if contender == "keras trainable=False":
        for layer in model.layers:
            layer.trainable = layer.name == "predictions"
    fn = common.train_step(model, optimizer, keras.losses.SparseCategoricalCrossentropy())
    step = (gf.freeze("*", gf.Unfreeze("predictions/*"))(fn) if contender == "graphfreeze"
            else tf.function(fn))
    rng = np.random.default_rng(0)
    args = (rng.normal(size=(8, size, size, 3)).astype("float32"),
            rng.integers(0, 10, 8).astype("int32"))
    return step, optimizer, args


def tokens(contender: str, quick: bool):
    vocab, width, hidden, batch, seq, n_new = ((4000, 128, 512, 4, 32, 16) if quick
                                               else (32000, 512, 2048, 8, 64, 16))
    init = weights(vocab, width, hidden)
    rng = np.random.default_rng(1)
    new_rows = np.arange(vocab - n_new, vocab)
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    ids[:, ::4] = rng.choice(new_rows, ids[:, ::4].shape)
    labels = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    if contender == "hand-written split":
        fn, _ = split_step(init, n_new)
        step = tf.function(fn)
    else:
        fn, w = full_step(init)
        step = (gf.freeze("*", gf.Unfreeze(gf.Rows(w["table"], new_rows)))(tf.function(fn))
                if contender == "graphfreeze" else tf.function(fn))
    optimizer = _closure_optimizer(fn)
    return step, optimizer, (ids, labels)


def _closure_optimizer(fn):
    for cell in fn.__closure__ or ():
        if isinstance(cell.cell_contents, keras.optimizers.Optimizer):
            return cell.cell_contents
    raise RuntimeError("no optimizer in the step's closure")


MODELS = {
    "resnet50": (resnet, ["graphfreeze", "keras trainable=False", "train everything"]),
    "tokens": (tokens, ["graphfreeze", "hand-written split", "train everything"]),
}


def status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries the
    parent's peak over fork and exec, so every subprocess would report the parent's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def measure_one(model: str, contender: str, steps: int, quick: bool) -> dict:
    """Run in a fresh process: state bytes, peak RSS and RSS after `steps` steps."""
    step, optimizer, args = MODELS[model][0](contender, quick)
    for _ in range(steps):
        common.sync(step(*args))
    gc.collect()
    return {"state_bytes": state_bytes(optimizer), "rss_after": status_bytes("VmRSS"),
            "peak_rss": status_bytes("VmHWM")}


def side_by_side(model: str, steps: int, quick: bool) -> dict[str, int]:
    """Optimizer-state bytes of every contender, all built in this one process."""
    build, contenders = MODELS[model]
    out = {}
    for contender in contenders:
        step, optimizer, args = build(contender, quick)
        for _ in range(steps):
            common.sync(step(*args))
        out[contender] = state_bytes(optimizer)
    return out


def main(argv=None) -> int:
    parser = common.arguments(__doc__, rounds=1, steps=3)
    parser.add_argument("--contender", nargs=2, metavar=("MODEL", "CONTENDER"),
                        help="internal: measure one contender and print JSON")
    args = parser.parse_args(argv)
    if args.contender:
        print("RESULT " + json.dumps(measure_one(*args.contender, args.steps, args.quick)))
        return 0
    results = {}
    for model, (_, contenders) in MODELS.items():
        state = side_by_side(model, args.steps, args.quick)
        rows = {}
        for contender in contenders:
            cmd = [sys.executable, __file__, "--contender", model, contender,
                   "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rss = json.loads(out.rsplit("RESULT ", 1)[1])
            rows[contender] = {"state_bytes": state[contender], "peak_rss": rss["peak_rss"],
                               "rss_after": rss["rss_after"],
                               "state_bytes_subprocess": rss["state_bytes"]}
        results[model] = rows
        reference = contenders[1]
        print(common.table(
            f"{model}: optimizer state after {args.steps} steps, peak RSS per fresh process",
            [(c, f"{r['state_bytes'] / MIB:.2f}", f"{r['state_bytes'] / rows[reference]['state_bytes']:.2f}",
              f"{r['peak_rss'] / MIB:.0f}", f"{r['rss_after'] / MIB:.0f}") for c, r in rows.items()],
            ("contender", "state MiB", f"x {reference}", "peak RSS MiB", "RSS after MiB")))
    path = common.write_json("memory" + ("_quick" if args.quick else ""), {
        "config": {"steps": args.steps, "optimizer": "Adam (ResNet50), AdamW (tokens)",
                   "resnet_input": 32 if args.quick else 64, "batch": 8},
        "models": results,
        "command": "python bench/bench_memory.py " + " ".join(argv or sys.argv[1:])})
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
