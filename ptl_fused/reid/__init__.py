"""Person re-identification: evaluation protocol (more to come: datasets, sampler, losses)."""

from .evaluation import evaluate

__all__ = ["evaluate"]
