"""Ray Train: the recipes run by Ray Train's ``TorchTrainer`` on a Ray cluster (``scripts/ray_train.py``).

driver (the launcher: flags, Ray, the trainer, stops, the exit status), worker (one process of the
recipe inside a Ray Train worker), control (the actor between the two). Ray itself is an optional
extra (``pip install "ray[train]"``): nothing else in the suite imports this package.
"""
