"""Datasets (registry kind ``dataset``): each returns samples {image, mask, text, id}."""

from segrouter.datasets import grefcoco, hf_refer, reasonseg, refcoco, synthetic  # noqa: F401  (registers built-ins)
