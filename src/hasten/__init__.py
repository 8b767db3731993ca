"""hasten: cheaper neural-network training, every method measured on your own model and hardware."""

import sys
import types

from hasten.config import ConfigError, RunConfig, load_config

__version__ = "0.1.0"
__all__ = ["ConfigError", "RunConfig", "export", "generate_text", "load_config", "train", "__version__"]

_ENTRY_POINTS = ("export", "generate_text", "train")  # of hasten.api, which imports torch and the trainer


def __getattr__(name: str) -> object:
    """hasten.train, hasten.generate_text and hasten.export load torch and the trainer when first used:
    `import hasten` alone stays light, so the `hasten` command answers --help or a bad key at once."""
    if name in _ENTRY_POINTS:
        from hasten import api

        return getattr(api, name)
    raise AttributeError(f"module 'hasten' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_ENTRY_POINTS})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        # Importing the hasten.train package binds it here as `train`: hasten.train stays the function
        # (the package is sys.modules["hasten.train"], imported with `from hasten.train... import`).
        if name in _ENTRY_POINTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
