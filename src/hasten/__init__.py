"""hasten: cheaper neural-network training, every method measured on your own model and hardware."""

from hasten.config import ConfigError, RunConfig, load_config
from hasten.api import export, generate_text, train

__version__ = "0.1.0"
__all__ = ["ConfigError", "RunConfig", "export", "generate_text", "load_config", "train", "__version__"]
