"""hybrid_accel: hybrid-supervised medical image segmentation (DII + DCR) on Accelerate."""

__version__ = "0.1.0"
