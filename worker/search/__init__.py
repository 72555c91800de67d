"""The DARTS recurrent-cell search engine: pure PyTorch, everything by argument, progress by callback."""

from .spec import JobSpec

__all__ = ["JobSpec"]
