"""inference-tuner: resource profiling and runtime tuning for model inference."""

__version__ = "0.1.0"
