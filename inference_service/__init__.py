"""The splatface inference service: builds, poses, renders and exports avatars."""

__version__ = "0.1.0"
