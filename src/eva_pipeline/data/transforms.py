"""Image normalisation shared by student and teacher (spec section 4: both see the identical tensor)."""

from __future__ import annotations

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
