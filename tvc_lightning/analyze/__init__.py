"""Visual-forgetting analyses of a checkpoint (``python -m tvc_lightning analyze``).

- :mod:`.forgetting`: per-layer attention share on the original image and on re-injected copies
  over the response, plain and PVC decoding (CSV, PNG, W&B).
- :mod:`.removal`: the image-removal curve, accuracy when the image is hidden from a fraction
  ``r`` of the answer on (CSV, PNG, W&B).

See :mod:`.cli` for the flags.
"""

from tvc_lightning.analyze.forgetting import ForgettingResult, analyze_forgetting
from tvc_lightning.analyze.removal import RemovalResult, analyze_removal, hide_step

__all__ = ["ForgettingResult", "RemovalResult", "analyze_forgetting", "analyze_removal", "hide_step"]
