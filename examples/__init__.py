"""Seed scenarios, runnable as scripts (``python examples/<name>.py``) or through
``graphfreeze demo``. Each prints its freeze report and checks its own claim."""

SCENARIOS = [
    "seed000_grow_layer",
    "seed001_reuse_lower_layers",
    "seed001_bottleneck_cache",
    "seed002_fixed_embedding_rows",
    "seed003_shared_early_layers",
    "seed004_keep_output_constant",
    "keras_fit_transfer",
    "conv_backbone_cache",
    "gradual_unfreezing_fit",
    "trainable_tokens_io",
    "discriminative_finetuning",
]
