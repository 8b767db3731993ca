"""The search space as one network: every layer holds all candidate mixers, mixed by learned weights.

DARTS (Liu, Simonyan & Yang 2019, *Differentiable Architecture Search*) relaxes a discrete choice
among candidate operations into a softmax over architecture parameters alpha: a layer's output is
sum_k softmax(alpha)_k * op_k(x), so the choice is trained by gradient descent alongside the
weights, and the architecture is read off at the end as each layer's argmax. Here the choice is
each decoder layer's sequence mixer among hasten's mixer letters (A attention, M Mamba-2): the
derived architecture is a `model.mixers` pattern that `hasten train` builds directly.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from hasten.config import MIXER_LETTERS, ConfigError, ModelConfig


class MixedMixer(nn.Module):
    """One layer's candidates and its architecture parameters `alpha` (one per candidate)."""

    def __init__(self, candidates: dict[str, nn.Module]) -> None:
        super().__init__()
        self.letters = "".join(candidates)
        self.candidates = nn.ModuleDict(candidates)
        self.alpha = nn.Parameter(torch.zeros(len(candidates)))

    def probabilities(self) -> torch.Tensor:
        return F.softmax(self.alpha.float(), dim=0)

    def forward(self, x_BTD: torch.Tensor, rope: object = None, **kwargs: object) -> torch.Tensor:
        weights = self.probabilities().to(x_BTD.dtype)
        return sum(weights[k] * op(x_BTD, rope=rope, **kwargs) for k, op in enumerate(self.candidates.values()))


def check_candidates(letters: str) -> str:
    if len(letters) < 2 or len(set(letters)) != len(letters) or any(c not in MIXER_LETTERS for c in letters):
        raise ConfigError(f"nas.candidates={letters!r} must be two or more different mixer letters of "
                          f"{MIXER_LETTERS!r} (A attention, M Mamba-2).")
    return letters


def build_supernet(config: ModelConfig, vocab_size: int, letters: str, device: torch.device | str = "cpu") -> nn.Module:
    """hasten's decoder with a MixedMixer in every layer. Each candidate is initialized as the
    decoder of that letter alone would be (deterministic under the caller's seed); embedding,
    norms, FFNs and head are those of the first letter's decoder."""
    from hasten.models import build_model

    check_candidates(letters)
    donors = {}
    for letter in letters:
        donors[letter] = build_model(dataclasses.replace(config, mixers=letter), vocab_size, device)
    model = donors[letters[0]]
    for i, layer in enumerate(model.layers):
        layer.mixer = MixedMixer({letter: donors[letter].layers[i].mixer for letter in letters})
    return model


def mixed_layers(model: nn.Module) -> list[MixedMixer]:
    return [m for m in model.modules() if isinstance(m, MixedMixer)]


def architecture_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [m.alpha for m in mixed_layers(model)]


def weight_parameters(model: nn.Module) -> list[nn.Parameter]:
    alphas = {id(a) for a in architecture_parameters(model)}
    return [p for p in model.parameters() if id(p) not in alphas]


def derive(model: nn.Module) -> str:
    """The discrete architecture: each layer's most probable candidate, as a `model.mixers` pattern."""
    return "".join(m.letters[int(m.alpha.argmax())] for m in mixed_layers(model))


def expected_latency(model: nn.Module, latency_ms: dict[str, float]) -> torch.Tensor:
    """sum over layers of sum_k p_k * latency_k: the differentiable latency of the mixed network
    (FBNet, Wu et al. 2019; ProxylessNAS, Cai et al. 2019), in the table's milliseconds."""
    total = torch.zeros(())
    for m in mixed_layers(model):
        table = torch.tensor([latency_ms[c] for c in m.letters], device=m.alpha.device)
        total = total.to(m.alpha.device) + (m.probabilities() * table).sum()
    return total
