"""Schemathesis hooks (``SCHEMATHESIS_HOOKS=schemathesis_hooks``): what the published schema
states in words but JSON Schema cannot, taught to the generator.

- ``format: binary`` (the image upload): real images, a few sizes and colour modes, so that
  schema-valid requests carry an image the model can read (random bytes are refused with 422,
  rightly, as "not an image").
- A multipart body with an empty list for a value: the encoder sends no part at all for it,
  so the request on the wire is not the (schema-violating) one generated; such bodies are not
  drawn.
- A chat ``case``: its probabilities add up to 1 and `predicted_label` is one of them (the
  schema's description says so); a well-formed generated case is rescaled to satisfy that.
  Cases with an invalid part are left as generated.
"""

from __future__ import annotations

import io
import math

import schemathesis
from hypothesis import strategies as st


def _png(width: int, height: int, mode: str, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype="uint8"), mode).save(buffer, "PNG")
    return buffer.getvalue()


IMAGES = [_png(40, 36, "RGB", 0), _png(64, 64, "L", 1), _png(33, 90, "RGB", 2)]
schemathesis.openapi.format("binary", st.sampled_from(IMAGES))


def _label(value) -> bool:
    return isinstance(value, str) and bool(value.strip()) and len(value) <= 80


@schemathesis.hook
def map_body(context, body):
    case = body.get("case") if isinstance(body, dict) else None
    if not isinstance(case, dict):
        return body
    probabilities = case.get("probabilities")
    if not (
        isinstance(probabilities, dict)
        and 0 < len(probabilities) <= 50
        and all(_label(k) for k in probabilities)
        and all(
            isinstance(v, int | float)
            and not isinstance(v, bool)
            and math.isfinite(v)
            and 0 <= v <= 1
            for v in probabilities.values()
        )
        and _label(case.get("predicted_label"))
    ):
        return body
    total = sum(probabilities.values())
    n = len(probabilities)
    case["probabilities"] = {
        k: (v / total if total > 0 else 1 / n) for k, v in probabilities.items()
    }
    case["predicted_label"] = max(case["probabilities"], key=case["probabilities"].get)
    return body


UPLOADS = frozenset({"/predict", "/explain", "/similar", "/report"})


@schemathesis.hook
def filter_body(context, body):
    if context.operation.path in UPLOADS and isinstance(body, dict):
        return all(value != [] for value in body.values())
    return True
