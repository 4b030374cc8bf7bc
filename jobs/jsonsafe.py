"""Standard JSON for files and output that other tools read: NaN and ±inf have no JSON form (Python
writes bare NaN/Infinity, which strict parsers refuse), so they become null, and numpy scalars
Python numbers. Where null must say which, the data carries it (`CategoryShift.as_dict`)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def json_safe(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, mapping keys -> str."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def dumps(x: Any, **kw: Any) -> str:
    """json.dumps of json_safe(x), refusing anything non-standard left over."""
    return json.dumps(json_safe(x), allow_nan=False, **kw)
