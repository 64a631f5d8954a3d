"""The training engine both recipes share: the loss terms, the Trainer subclass, callbacks, checkpoints, LoRA,
memory tuning and the loss plot. The recipes (`selfcog.recipes`) put these parts together."""
