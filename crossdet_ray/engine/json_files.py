"""JSON as the run's files hold it (NaN and infinity written as null); no torch, so the
driver can write its files without importing the training stack."""

from __future__ import annotations

import json
import math
from typing import Any


def json_safe(value: Any) -> Any:
    """NaN and infinity are not JSON; write null so pandas and jq read the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps_json(value: Any) -> str:
    return json.dumps(json_safe(value), indent=2, default=str)
