"""Pretrained weights: reading foreign checkpoint formats and mapping them to our module names."""
