"""The interpretability primer's methods as one call each, built only on the public client API.

Each recipe packs its work into as few requests and forward passes as it can (batched invokes,
sessions) and returns a small result object: the numbers as tensors, token labels, and `.plot(path)`
writing a PNG.
"""

from ._result import RecipeResult

__all__ = ["RecipeResult"]
