"""The interpretability primer's methods as one call each, built only on the public client API.

Each recipe packs its work into as few requests and forward passes as it can (batched invokes,
sessions) and returns a small result object: the numbers as tensors, token labels, and `.plot(path)`
writing a PNG.
"""

from ._result import RecipeResult
from .activations import CollectedActivations, collect_activations
from .attention import AttentionPatternsResult, HeadScoresResult, attention_patterns, head_scores
from .attribution import DLAResult, direct_logit_attribution
from .inputs import InputAttributionResult, input_attribution
from .lens import LogitLensResult, logit_lens
from .patching import PatchingResult, activation_patching, attribution_patching
from .steering import SteeredGeneration, generate, steering_vector

__all__ = [
    "RecipeResult",
    "logit_lens", "LogitLensResult",
    "direct_logit_attribution", "DLAResult",
    "attention_patterns", "AttentionPatternsResult", "head_scores", "HeadScoresResult",
    "activation_patching", "attribution_patching", "PatchingResult",
    "input_attribution", "InputAttributionResult",
    "steering_vector", "generate", "SteeredGeneration",
    "collect_activations", "CollectedActivations",
]
