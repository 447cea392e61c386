"""Rewrite the README's bench tables from bench/results/*.json (between <!-- bench:NAME -->
markers), so the figures in the README are always the ones the benches last produced.

    python bench/update_readme.py
"""

from __future__ import annotations

import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "..", "README.md")


def _load(name: str) -> dict | None:
    path = os.path.join(HERE, "results", f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _rows(times: dict, ratios: dict, ratio_name: str) -> str:
    lines = [f"| variant | ms/step | × {ratio_name} |", "|---|---|---|"]
    lines += [f"| {k} | {v * 1e3:.1f} | {ratios[k]:.2f} |" for k, v in times.items()]
    return "\n".join(lines)


def _median(c: dict) -> str:
    return f"(median of {c['rounds']} rounds × {c['steps_per_round']} steps)"


def core(d: dict) -> str:
    st, rt, c = d["step_time"], d["rewrite_time"], d["step_time"]["config"]
    return (f"Deep MLP, {c['depth']} hidden layers of {c['width']}, batch {c['batch']}, "
            f"{c['optimizer']}, the {c['frozen']} lowest layers frozen {_median(c)}:\n\n"
            + _rows(st["seconds_per_step"], st["ratio_vs_keras_trainable_false"],
                    "Keras `trainable=False`")
            + f"\n\n`gf.rewrite` of a ResNet50 train step ({rt['config']['model']}, "
              f"{rt['graph_nodes']:,} nodes; backbone frozen, head trains → "
              f"{rt['rewritten_nodes']:,} nodes): **{rt['gf_rewrite_s']:.2f} s against "
              f"{rt['plain_trace_s']:.2f} s for one plain trace of the same step "
              f"({rt['ratio']:.2f}×)**, tracing included (median of {rt['config']['repeats']}).")


def partial(d: dict) -> str:
    c = d["config"]
    return (f"Grow case: {c['depth']} hidden layers of {c['old_units']}+{c['new_units']} units, "
            f"the old units frozen by `Columns`/`Rows` rules ({c['frozen_parameters']:,} of "
            f"{c['parameters']:,} parameters), batch {c['batch']}, {c['optimizer']}"
            f"{', every step compiled with XLA (`--jit`)' if c.get('jit_compile') else ''} "
            f"{_median(c)}:\n\n"
            + _rows(d["seconds_per_step"], d["ratio_vs_mask_trick"], "seed-002 mask trick"))


def corpus(d: dict) -> str:
    c = d["config"]
    lines = ["| model | traced step ops | graphfreeze ops | Keras `trainable=False` ops | "
             "graphfreeze ms/step | `trainable=False` ms/step | ratio |", "|---|---|---|---|---|---|---|"]
    for r in d["models"]:
        t = r["seconds_per_step"]
        lines.append(f"| {r['model']} | {r['ops']['traced']:,} | {r['ops']['graphfreeze']:,} | "
                     f"{r['ops']['keras_trainable_false']:,} | {t['graphfreeze'] * 1e3:.0f} | "
                     f"{t['keras trainable=False'] * 1e3:.0f} | {r['ratio']:.2f} |")
    return (f"keras.applications models (`weights=None`), everything but the head frozen, frozen "
            f"BatchNorm in inference mode (`batchnorm_inference=True`), batch {c['batch']} at "
            f"{c['image']}×{c['image']}, Adam {_median(c)}:\n\n" + "\n".join(lines))


def transfer(d: dict) -> str:
    c = d["config"]
    return (f"`match_layers` between {c['source']} and {c['target']} ({d['pairs']} of "
            f"{d['target_layers_with_weights']} target layers with weights match, "
            f"{d['parameters_matched']:,} parameters), against one plain trace of the source's "
            f"train step ({d['graph_nodes']:,} nodes); median of {c['repeats']}:\n\n"
            "| what | seconds | × one trace |\n|---|---|---|\n"
            f"| plain trace of the train step | {d['plain_trace_s']:.2f} | 1.00 |\n"
            f"| `match_layers` on the Keras layer graphs (functional, Sequential) | "
            f"{d['match_keras_s']:.3f} | {d['ratio_keras']:.3f} |\n"
            f"| `match_layers` on traced forward graphs (needed for subclassed models) | "
            f"{d['match_traced_s']:.2f} | {d['ratio_traced']:.2f} |")


def distribute(d: dict) -> str:
    c = d["config"]
    return (f"{c['strategy']}, custom `strategy.run` step: MLP {c['depth']}×{c['width']}, global batch "
            f"{c['global_batch']}, {c['optimizer']}, the {c['frozen']} lowest layers frozen "
            f"{_median(c)}:\n\n"
            + _rows(d["seconds_per_step"], d["ratio_vs_keras_trainable_false"],
                    "Keras `trainable=False` (same strategy)"))


def cache(d: dict) -> str:
    lines = ["| backbone | variant | ms/epoch |", "|---|---|---|"]
    for case in d["cases"]:
        for variant, t in case["seconds_per_epoch"].items():
            lines.append(f"| {case['case']} | {variant} | {t * 1e3:.1f} |")
        lines.append(f"| {case['case']} | **cache vs hand-made head / speedup vs uncached** | "
                     f"**{case['ratio_vs_hand_head']:.2f}× / {case['speedup_vs_uncached']:.1f}×** |")
    return (f"Epoch time, median of {d['config']['rounds']} epochs per variant, epochs interleaved "
            "(filling the cache is done once, before, and not counted):\n\n" + "\n".join(lines))


def fit(d: dict) -> str:
    c = d["config"]
    lines = ["| policy | optimizer (as Keras compiled it) | graphfreeze ms/epoch | "
             "`trainable=False` ms/epoch | ratio |", "|---|---|---|---|---|"]
    for r in d["policies"]:
        t = r["seconds_per_epoch"]
        lines.append(f"| `{r['policy']}` | {r['optimizer']} | {t['graphfreeze'] * 1e3:.0f} | "
                     f"{t['keras trainable=False'] * 1e3:.0f} | {r['ratio']:.2f} |")
    return (f"`model.fit` of {c['model']}, backbone frozen (`batchnorm_inference=True`), head "
            f"trains, Adam; {c['batches_per_epoch']} batches of {c['batch']} at "
            f"{c['image']}×{c['image']} per epoch, epochs interleaved (median of {c['rounds']}):\n\n"
            + "\n".join(lines))


def scale(d: dict) -> str:
    c = d["config"]
    return (f"Layer decay {c['decay']} over an MLP of {c['depth']} hidden layers of {c['width']} "
            f"and a head, batch {c['batch']}, {c['optimizer']} {_median(c)}:\n\n"
            + _rows(d["seconds_per_step"], d["ratio_vs_per_layer_optimizers"],
                    "one optimizer per layer"))


def memory(d: dict) -> str:
    titles = {"resnet50": f"ResNet50 (`weights=None`, {d['config']['resnet_input']}×"
                          f"{d['config']['resnet_input']}, 10 classes), head only, Adam",
              "tokens": "trainable tokens (32,000 × 512 tied table, 16 rows train), AdamW"}
    lines = ["| model | contender | optimizer state MiB | × reference | peak RSS MiB | "
             "RSS after MiB |", "|---|---|---|---|---|---|"]
    for model, rows in d["models"].items():
        reference = list(rows)[1]
        for name, r in rows.items():
            ratio = r["state_bytes"] / rows[reference]["state_bytes"]
            lines.append(f"| {titles.get(model, model)} | {name} | {r['state_bytes'] / 2**20:.2f} | "
                         f"{ratio:.2f} | {r['peak_rss'] / 2**20:.0f} | {r['rss_after'] / 2**20:.0f} |")
    return (f"Optimizer variables after {d['config']['steps']} steps (slots and counters; the "
            "reference is `trainable=False`, or for rows the hand-written split program), "
            f"batch {d['config']['batch']}:\n\n" + "\n".join(lines))


def tokens(d: dict) -> str:
    c = d["config"]
    return (f"Trainable tokens: {c['trainable_rows']} of {c['vocab']:,} rows of a tied "
            f"{c['vocab']:,} × {c['width']} table under two residual MLP blocks ({c['width']} → "
            f"{c['hidden']} → {c['width']}), batch {c['batch']} × {c['sequence']}, "
            f"{c['optimizer']} {_median(c)}:\n\n"
            + _rows(d["seconds_per_step"], d["ratio_vs_hand_written"], "hand-written split program"))


def flat_mask(d: dict) -> str:
    c = d["config"]
    lines = ["| trainable fraction | flat gather/scatter ms/step | dense select ms/step | "
             "× dense |", "|---|---|---|---|"]
    for f, ratio in d["flat_over_dense"].items():
        lines.append(f"| {f} | {d['seconds_per_step'][f'flat {f}'] * 1e3:.1f} | "
                     f"{d['seconds_per_step'][f'dense {f}'] * 1e3:.1f} | {ratio:.2f} |")
    return (f"Random `Mask` on a {c['width']} × {c['width']} kernel between two trainable "
            f"layers, {c['optimizer']}, batch {c['batch']} {_median(c)}:\n\n" + "\n".join(lines))


def temporaries(d: dict) -> str:
    def title(model: str, c: dict, chains: int) -> str:
        if model == "tokens":
            return (f"trainable tokens ({c['trainable_rows']} of {c['vocab']:,} rows of a tied "
                    f"{c['vocab']:,} × {c['width']} table), {c['optimizer']}; the table's chain")
        return (f"grow case ({c['depth']} layers of {c['old_units']}+{c['new_units']}), "
                f"{c['optimizer']}; chains of the {chains} partly frozen kernels and biases")

    lines = ["| model | contender | temporaries MiB | × slicing off | ops | full-size tensors |",
             "|---|---|---|---|---|---|"]
    for model, r in d["models"].items():
        for name, c in r["contenders"].items():
            what = title(model, r["config"], len(r["chains_of"]))
            lines.append(f"| {what} | {name} | {c['bytes'] / 2**20:.1f} | "
                         f"{c['ratio_vs_unsliced']:.2f} | {c['ops']} | "
                         f"{c['variable_sized_tensors']} |")
    return ("Bytes per step of the outputs of the ops that feed only the updates of the partly "
            "frozen variables (weight gradients and optimizer update chains of the variable and "
            "its slots; not the loss, not another variable's update), read from the emitted "
            "graph's shapes; \"full-size\" counts those tensors with a variable's full shape:\n\n"
            + "\n".join(lines))


def conv_grow(d: dict) -> str:
    c = d["config"]
    return (f"Conv2D grow: a 3×3 conv {c['width']} → {c['old_channels']}+{c['new_channels']} "
            f"channels between trainable convs, the {c['old_channels']} old output channels "
            f"frozen by `Columns`/`Rows` rules, batch {c['batch']} × {c['image']}×{c['image']}, "
            f"{c['optimizer']} {_median(c)}:\n\n"
            + _rows(d["seconds_per_step"], d["ratio_vs_train_everything"], "train everything"))


def depthwise_grow(d: dict) -> str:
    c = d["config"]
    return (f"Grown MobileNet-style block: a 3×3 conv 3 → {c['old_channels']}+{c['new_channels']} "
            f"channels, then a 3×3 `DepthwiseConv2D` over them, then a trainable 1×1 conv to "
            f"{c['width']}; the {c['old_channels']} old channels of both grown layers frozen "
            f"(`Columns`/`Rows`, and a `Mask` of whole input channels on the depthwise kernel), "
            f"batch {c['batch']} × {c['image']}×{c['image']}, {c['optimizer']} {_median(c)}:\n\n"
            + _rows(d["seconds_per_step"], d["ratio_vs_train_everything"], "train everything"))


def fused(d: dict) -> str:
    c = d["config"]
    return (f"A {c['width']} × {c['width']} kernel between two trainable layers, "
            f"{c['trainable_rows']} trainable rows, batch {c['batch']}, tf_keras legacy "
            f"optimizers {_median(c)}; each ratio against training everything under the same "
            "optimizer:\n\n"
            + _rows(d["seconds_per_step"], d["ratio_vs_train_everything"], "train everything"))


SECTIONS = {"core": core, "fit": fit, "partial": partial, "partial_xla": partial, "corpus": corpus,
            "transfer": transfer,
            "distribute": distribute, "cache": cache, "scale": scale, "memory": memory,
            "tokens": tokens, "flat_mask": flat_mask, "temporaries": temporaries,
            "conv_grow": conv_grow, "depthwise_grow": depthwise_grow, "fused": fused}


def main() -> int:
    with open(README) as f:
        text = f.read()
    for name, render in SECTIONS.items():
        data = _load(name)
        if data is None:
            continue
        block = (f"<!-- bench:{name} -->\n{render(data)}\n\n"
                 f"Produced by `{data['command'].strip()}` on {data['machine']['platform']}, "
                 f"{data['machine']['cpus']} CPUs, TensorFlow {data['machine']['tensorflow']}.\n"
                 f"<!-- /bench:{name} -->")
        text, n = re.subn(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", block, text,
                          flags=re.S)
        if n == 0:
            print(f"README has no <!-- bench:{name} --> section", file=sys.stderr)
    with open(README, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
