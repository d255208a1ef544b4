"""The Ray actor–learner runtime and the two ``drpo train`` entry points (``train_ray.py``, ``train_local.py``).

``cluster.py`` connects and starts the roles of ``roles.py``; ``actors.py`` holds the actor bodies,
``replica_pool.py`` the fault-tolerant pools, ``pipeline.py`` and ``controller.py`` the driver's loop,
``weights.py`` and ``weight_sync.py`` how new policy weights reach the generators (docs/ray.md).
"""
