"""selfcog: give a small open chat model its own identity, keep what it knew, chat with it, serve it, ship it."""

__all__ = ["load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_model":
        from selfcog.models import load_model  # torch: on first use, so `import selfcog.config` stays light

        return load_model
    raise AttributeError(f"module 'selfcog' has no attribute {name!r}")
