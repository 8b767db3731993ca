"""Knowledge distillation: a frozen teacher's softened predictions train a smaller student.

Hinton, Vinyals & Dean 2015, *Distilling the Knowledge in a Neural Network*: the student matches
the teacher's distribution softened by a temperature T, through

    kd = T^2 * KL(softmax(teacher / T) || softmax(student / T)),

averaged over the positions that have a target. T^2 keeps the soft term's gradient on the scale
of the hard one's as T changes. A run with `distill.teacher` trains on
(1 - alpha) * cross-entropy + alpha * kd (hasten.train.build.distill_lm_loss), and its validation
loss stays the plain cross-entropy, comparable with any run on the same data.

In your own loop: `loss = (1 - a) * F.cross_entropy(s, y) + a * kd_loss(s, t.detach(), 2.0)` with
the teacher's logits `t` computed under `torch.no_grad()`.

Shape legend: N positions (any leading dimensions flattened), V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the temperature-softened distributions over the last
    dimension, the mean over positions (those where `mask` is True, when given), in fp32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: distillation needs one vocabulary")
    vocab = student_logits.shape[-1]
    log_s_NV = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    log_t_NV = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    kl_N = F.kl_div(log_s_NV, log_t_NV, reduction="none", log_target=True).sum(-1)
    if mask is None:
        return kl_N.mean() * temperature**2
    keep_N = mask.reshape(-1).to(kl_N.dtype)
    return (kl_N * keep_N).sum() / keep_N.sum().clamp(min=1) * temperature**2
