"""Backend adapters: each translates one backend's inputs and logits to the fusion core in ``detox.fusion``.

Heavy backends are imported lazily, so ``import detox`` works with only the backends a user installed.
"""
