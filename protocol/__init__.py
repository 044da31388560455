"""The splatface wire protocol: the only code both the service and Blender import.

Depends on numpy, pyzmq and msgpack only. See ``SPEC.md`` beside this file.
"""

from .animation import (
    LLF_COLUMNS,
    Animation,
    format_timecode,
    head_pivot,
    head_rotation,
    load_animation,
    parse_timecode,
    save_livelink_csv,
)
from .arkit import ARKIT_NAMES, NUM_SHAPES, check_curves, reorder
from .client import Client, CurveKeys
from .codec import PROTOCOL_VERSION, Limits, Message, decode, encode
from .errors import ProtocolError
from .messages import OPS, PASSES, PRESETS

__all__ = [
    "ARKIT_NAMES",
    "LLF_COLUMNS",
    "NUM_SHAPES",
    "OPS",
    "PASSES",
    "PRESETS",
    "PROTOCOL_VERSION",
    "Animation",
    "Client",
    "CurveKeys",
    "Limits",
    "Message",
    "ProtocolError",
    "check_curves",
    "decode",
    "encode",
    "format_timecode",
    "head_pivot",
    "head_rotation",
    "load_animation",
    "parse_timecode",
    "reorder",
    "save_livelink_csv",
]
