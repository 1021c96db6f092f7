"""tritonforge's engine: models, kernel registry, trainer, data, configuration, logging and CLI."""
__version__ = "0.1.0"
