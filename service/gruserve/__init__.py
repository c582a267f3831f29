"""gruserve: serve Keras GRU models with per-session state."""

__version__ = "0.2.0"
