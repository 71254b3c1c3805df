"""fape: all-in-one image restoration with frequency-aware planning and execution."""

__version__ = "0.1.0"
