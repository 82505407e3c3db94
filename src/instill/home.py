"""$INSTILL_HOME (default ~/.cache/instill): instill's own caches, one folder each.

    models/           GGUF files converted to safetensors (models/resolve.py)
    data-cache/       tokenised training data (data/dataset.py)
    base-replies/     the base model's replies to the anchor prompts (anchors.py)
    reference-cache/  a preference run's reference log-probs (train/objective.py)

Below every package: data, models, eval and train all keep a cache here, so its root is nobody's.
"""

from __future__ import annotations

import os
from pathlib import Path


def instill_home() -> Path:
    return Path(os.environ.get("INSTILL_HOME", Path.home() / ".cache" / "instill")).expanduser()
