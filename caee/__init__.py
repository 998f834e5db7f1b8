"""caee: class-specific adversarial erasing (OC-CSE) for weakly supervised semantic segmentation."""

__version__ = "0.1.0"
