"""Purification defenses: maps from [0,1] images to [0,1] images of the same shape."""

from .base import Defense, NoDefense, check_images

__all__ = ["Defense", "NoDefense", "check_images"]
