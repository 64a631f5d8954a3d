"""selfcog: give a small open chat model its own identity, keep what it knew, chat with it, serve it, ship it."""

from selfcog.models import load_model

__all__ = ["load_model"]
__version__ = "0.1.0"
