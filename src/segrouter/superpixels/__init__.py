"""Superpixel partitions of images: SAM automatic masks (the paper's "visual words"), SLIC (a weight-free
stand-in), shared region merging and a disk cache. A partition is an int64 (H, W) map with labels
0..K-1 covering every pixel exactly once."""

from segrouter.superpixels.cache import PartitionCache
from segrouter.superpixels.regions import check_partition, merge_regions, relabel
from segrouter.superpixels.sam_amg import SAMAutomaticMaskGenerator
from segrouter.superpixels.slic import SLICGenerator

__all__ = [
    "PartitionCache",
    "SAMAutomaticMaskGenerator",
    "SLICGenerator",
    "check_partition",
    "merge_regions",
    "relabel",
]
