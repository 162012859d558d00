"""Direct-alignment losses on summed response log-probabilities (``docs/algorithms.md``, section 1).

Every loss takes the policy's and the reference's log-probabilities of the chosen (y+) and rejected (y-)
responses, each summed over response tokens only, and returns ``(losses, chosen_rewards,
rejected_rewards)``: the per-pair losses (not reduced) and the implicit rewards
``beta * (log pi_theta(y|x) - log pi_ref(y|x))`` (detached), as torchtune's ``rlhf/loss/dpo.py`` does.
With ``h = [log pi_theta(y+|x) - log pi_ref(y+|x)] - [log pi_theta(y-|x) - log pi_ref(y-|x)]``:

* DPO  (Rafailov et al. 2023, arXiv 2305.18290, eq. 7):      ``L = -log sigma(beta * h)``,        beta = 0.1
* IPO  (Azar et al. 2023, arXiv 2310.12036, eq. 17):          ``L = (h - 1 / (2 * beta))^2``,      beta = 1.0
* SLiC (Zhao et al. 2023, arXiv 2305.10425, calibration loss): ``L = max(0, 1 - beta * h)``,        beta = 0.002

The betas are the defaults of the OAIF paper (Guo et al. 2024, arXiv 2402.04792), which trains with all three.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LossOutput = tuple[Tensor, Tensor, Tensor]


def _rewards(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(h, chosen_rewards, rejected_rewards): the log-ratio margin and the detached implicit rewards."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    return chosen_ratio - rejected_ratio, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1) -> LossOutput:
    """DPO: ``L = -log sigma(beta * h)`` (Rafailov et al. 2023, eq. 7). Default beta 0.1 (OAIF)."""
    h, chosen_rewards, rejected_rewards = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return -F.logsigmoid(beta * h), chosen_rewards, rejected_rewards


def ipo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 1.0) -> LossOutput:
    """IPO: ``L = (h - 1 / (2 * beta))^2`` (Azar et al. 2023, eq. 17; beta is the paper's tau). Default 1.0.

    ``h`` uses summed log-probabilities, as the OAIF notes and TRL's online DPO trainer do. TRL's offline
    DPOTrainer divides each log-ratio by its response length first; pass per-token means to get that form.
    """
    h, chosen_rewards, rejected_rewards = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return (h - 1.0 / (2.0 * beta)) ** 2, chosen_rewards, rejected_rewards


def slic_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
              beta: float = 0.002) -> LossOutput:
    """SLiC: ``L = max(0, 1 - beta * h)`` (the hinge calibration loss of Zhao et al. 2023 on the DPO log-ratio
    margin, as OAIF uses it). Default beta 0.002: the hinge asks for a margin of ``1 / beta = 500`` nats."""
    h, chosen_rewards, rejected_rewards = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return torch.relu(1.0 - beta * h), chosen_rewards, rejected_rewards


LossFn = Callable[..., LossOutput]
LOSSES: dict[str, LossFn] = {"dpo": dpo_loss, "ipo": ipo_loss, "slic": slic_loss}
DEFAULT_BETA: dict[str, float] = {"dpo": 0.1, "ipo": 1.0, "slic": 0.002}
