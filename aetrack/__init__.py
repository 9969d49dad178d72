"""aetrack: train, compare, tune and serve autoencoders, tracked in MLflow."""

__version__ = "0.1.0"
