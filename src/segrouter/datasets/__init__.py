"""Datasets (registry kind ``dataset``): each returns samples {image, mask, text, id}."""

from segrouter.datasets import hf_refer, refcoco, synthetic  # noqa: F401  (registers built-ins)
