"""The search space as one network: every layer holds all candidate mixers, mixed by learned weights.

DARTS (Liu, Simonyan & Yang 2019, *Differentiable Architecture Search*) relaxes a discrete choice
among candidate operations into a softmax over architecture parameters alpha: a layer's output is
sum_k softmax(alpha)_k * op_k(x), so the choice is trained by gradient descent alongside the
weights, and the architecture is read off at the end as each layer's argmax. Here the choice is
each decoder layer's sequence mixer among hasten's mixer letters (A attention, M Mamba-2): the
derived architecture is a `model.mixers` pattern that `hasten train` builds directly. With FFN
candidates (D dense SwiGLU, E mixture of experts) each layer's FFN is chosen the same way, giving a
`model.ffns` pattern too.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from hasten.config import FFN_LETTERS, MIXER_LETTERS, ConfigError, ModelConfig


class MixedOp(nn.Module):
    """One layer's candidates for one slot (its mixer, or its FFN) and the architecture parameters
    `alpha` (one per candidate). Called as the slot is: the mixer with `rope` and the rest, the FFN
    with x alone."""

    def __init__(self, candidates: dict[str, nn.Module]) -> None:
        super().__init__()
        self.letters = "".join(candidates)
        self.candidates = nn.ModuleDict(candidates)
        self.alpha = nn.Parameter(torch.zeros(len(candidates)))

    def probabilities(self) -> torch.Tensor:
        return F.softmax(self.alpha.float(), dim=0)

    def forward(self, x_BTD: torch.Tensor, **kwargs: object) -> torch.Tensor:
        weights = self.probabilities().to(x_BTD.dtype)
        return sum(weights[k] * op(x_BTD, **kwargs) for k, op in enumerate(self.candidates.values()))


def check_candidates(letters: str, ffn: bool = False) -> str:
    """Two or more different letters of one slot (mixers, or FFNs when `ffn`)."""
    allowed, key, words = ((FFN_LETTERS, "nas.ffn_candidates", "D dense SwiGLU, E mixture of experts") if ffn
                           else (MIXER_LETTERS, "nas.candidates", "A attention, M Mamba-2"))
    if len(letters) < 2 or len(set(letters)) != len(letters) or any(c not in allowed for c in letters):
        raise ConfigError(f"{key}={letters!r} must be two or more different letters of {allowed!r} ({words}).")
    return letters


def build_supernet(config: ModelConfig, vocab_size: int, letters: str, device: torch.device | str = "cpu",
                   ffn_letters: str = "") -> nn.Module:
    """hasten's decoder with a MixedOp as every layer's mixer (over `letters`) and, with
    `ffn_letters`, as every layer's FFN. Each candidate is initialized as the decoder of that
    letter alone would be (deterministic under the caller's seed); embedding, norms, unsearched
    slots and head are those of the first letters' decoder."""
    from hasten.models import build_model

    check_candidates(letters)
    if ffn_letters:
        check_candidates(ffn_letters, ffn=True)
    first = {"mixers": letters[0], **({"ffns": ffn_letters[0]} if ffn_letters else {})}
    model = build_model(dataclasses.replace(config, **first), vocab_size, device)
    donors = {("mixer", c): build_model(dataclasses.replace(config, **{**first, "mixers": c}), vocab_size, device)
              for c in letters[1:]}
    donors |= {("ffn", c): build_model(dataclasses.replace(config, **{**first, "ffns": c}), vocab_size, device)
               for c in ffn_letters[1:]}
    for i, layer in enumerate(model.layers):
        layer.mixer = MixedOp({c: layer.mixer if c == letters[0] else donors["mixer", c].layers[i].mixer
                               for c in letters})
        if ffn_letters:
            layer.ffn = MixedOp({c: layer.ffn if c == ffn_letters[0] else donors["ffn", c].layers[i].ffn
                                 for c in ffn_letters})
    return model


def mixed_layers(model: nn.Module, slot: str = "") -> list[MixedOp]:
    """The MixedOps in layer order; `slot` 'mixer' or 'ffn' keeps that slot's only."""
    return [m for name, m in model.named_modules() if isinstance(m, MixedOp) and name.endswith(slot)]


def architecture_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [m.alpha for m in mixed_layers(model)]


def weight_parameters(model: nn.Module) -> list[nn.Parameter]:
    alphas = {id(a) for a in architecture_parameters(model)}
    return [p for p in model.parameters() if id(p) not in alphas]


def derive(model: nn.Module, slot: str = "mixer") -> str:
    """The discrete architecture: each layer's most probable candidate, as a `model.mixers` pattern
    (or `model.ffns`, with slot 'ffn'; empty when that slot was not searched)."""
    return "".join(m.letters[int(m.alpha.argmax())] for m in mixed_layers(model, slot))


def expected_latency(model: nn.Module, latency_ms: dict[str, float]) -> torch.Tensor:
    """sum over layers of sum_k p_k * latency_k: the differentiable latency of the mixed network
    (FBNet, Wu et al. 2019; ProxylessNAS, Cai et al. 2019), in the table's milliseconds."""
    total = torch.zeros(())
    for m in mixed_layers(model):
        table = torch.tensor([latency_ms[c] for c in m.letters], device=m.alpha.device)
        total = total.to(m.alpha.device) + (m.probabilities() * table).sum()
    return total
