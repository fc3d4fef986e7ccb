"""Model adapters, checkpoint loaders and the tiny default models (installed as streamrt.models)."""
