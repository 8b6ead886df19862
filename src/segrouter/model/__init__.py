"""The segmentation MLLM: composition of the registered parts, its sequence layout and its losses."""
