"""The shapes world: a procedural text-to-image testbed in which alignment is visible.

:mod:`.world` renders scenes, :mod:`.prompts` holds the prompts (GenEval templates and metadata) and the
train / held-out split, :mod:`.detector` is the classical-vision GenEval detector and colour classifier,
:mod:`.pretrain` trains the tiny one-step base generator with the Drifting objective.
"""
