"""Trainer construction: strategies, callbacks, loggers."""
