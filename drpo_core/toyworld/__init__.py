"""The shapes world: a procedural text-to-image testbed in which alignment is visible.

:mod:`.world` renders scenes, :mod:`.prompts` holds the prompts (GenEval templates and metadata) and the
train / held-out split, :mod:`.detector` is the classical-vision GenEval detector and colour classifier,
:mod:`.scene_encoder` is the trained φ, :mod:`.pretrain` trains the tiny one-step base generator with the
Drifting objective.
"""

from pathlib import Path

BASE_MODEL = Path(__file__).resolve().parent / "base_model"  # the committed base (``model.path: toy``)
SCENE_ENCODER = BASE_MODEL / "scene_encoder"  # its φ (``features.checkpoint: toy``)
