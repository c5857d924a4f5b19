"""The names of the loss terms, in the order reports list them (no dependencies: both the config
tree and the tensor code import it)."""

TERM_NAMES = ("task", "output", "visual_kl", "visual_relation", "feature", "knowledge", "attention")
