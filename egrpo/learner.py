"""The learner's work for one iteration, as a plain object: minibatches, old log-probs, clipped updates.

The in-process loop uses it with a torch optimiser; `runtime/learner` wraps the same object in a DeepSpeed
engine by overriding `backward` and `step` (and nothing of the loss or the minibatch logic), so both compute
the same algorithm.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from egrpo.algo.loss import grpo_loss, input_groups, loss_weights, step_mean_and_std
from egrpo.batch import Batch
from egrpo.config import TrainConfig
from egrpo.sampling.steps import gaussian_logprob


def make_minibatches(steps: Batch, batch_size: int, seed: int, min_size: int = 1) -> list[Batch]:
    """A seeded shuffle of the trained steps cut into minibatches of `batch_size`; a last one smaller than
    `min_size` joins the one before: with fewer rows than data-parallel ranks, a step would be mostly padding.

    Steps that leave the same state (the rollout's `input`: one E-GRPO group's branches, a tree node's
    children) are shuffled as one unit and kept next to each other, so that they can share one forward
    (`step_mean_and_std`); a minibatch then holds `batch_size` rows or more, up to the end of its last unit."""
    rows_of_unit = input_groups(steps)
    order = torch.randperm(len(rows_of_unit), generator=torch.Generator().manual_seed(seed)).tolist()
    cuts: list[list[int]] = [[]]
    for unit in order:
        if len(cuts[-1]) >= batch_size:
            cuts.append([])
        cuts[-1].extend(rows_of_unit[unit])
    if len(cuts) > 1 and len(cuts[-1]) < min_size:
        cuts[-2].extend(cuts.pop())
    return [steps.select(rows) for rows in cuts]


class GRPOLearner:
    def __init__(self, policy, train: TrainConfig, reduction: Literal["mean", "sum"] = "mean") -> None:
        self.policy = policy
        self.train = train
        self.reduction = reduction
        self.optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=train.lr,
                                           weight_decay=train.weight_decay)
        self.forwards = 0  # transformer forwards (rows of distinct input states) since the last train_iteration

    def transition(self, steps: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """`step_mean_and_std`, counting its forwards."""
        mean, std, forwards = step_mean_and_std(self.policy, steps)
        self.forwards += forwards
        return mean, std

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        """Accumulate the gradients of one micro-batch's (already weighted) loss."""
        loss.backward()

    def step(self) -> float:
        """Clip and step on the accumulated gradients, then clear them; returns the norm before clipping."""
        params = self.policy.trainable_parameters()
        if self.train.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.train.max_grad_norm)
        else:
            norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def micro_batches(self, minibatch: Batch) -> list[Batch]:
        """The pieces one forward pass takes (`train.micro_batch_size`; 0 = the whole minibatch)."""
        return minibatch.chunks(self.train.micro_batch_size or len(minibatch))

    @torch.no_grad()
    def old_logprobs(self, minibatches: list[Batch]) -> list[list[torch.Tensor]]:
        """log-probs under the current weights, computed in the same micro-batches (and so the same kernels)
        that training will use, so that rho == 1 exactly before the first step (ALGORITHMS.md section 2)."""
        out = []
        for mb in minibatches:
            out.append([])
            for micro in self.micro_batches(mb):
                mean, std = self.transition(micro)
                out[-1].append(gaussian_logprob(micro["x_out"].to(mean.device), mean, std, self.reduction))
        return out

    def update(self, minibatch: Batch, logp_old: list[torch.Tensor]) -> dict[str, float]:
        """One optimiser step on a minibatch: the loss of each micro-batch, its rows weighted by `loss_weights`
        (1 / rows: so the accumulated gradient is the minibatch mean's), is back-propagated in turn, then one
        step. Statistics are weighted the same way, so they too add up over micro-batches and ranks."""
        totals: dict[str, float] = {}
        weighted = Batch({**minibatch.tensors, "loss_weight": loss_weights(minibatch)}, minibatch.meta)
        micro_batches = self.micro_batches(weighted)
        for k, (micro, lo) in enumerate(zip(micro_batches, logp_old, strict=True)):
            mean, std = self.transition(micro)
            mean_ref = None
            if self.train.kl_beta > 0:
                with torch.no_grad(), self.policy.reference():
                    mean_ref, _ = self.transition(micro)
            loss, stats = grpo_loss(mean, std, micro, lo, self.train.clip_range, self.reduction, mean_ref,
                                    self.train.kl_beta, micro["loss_weight"], self.train.kl_form)
            self.backward(loss, last_micro_batch=k == len(micro_batches) - 1)
            stats["loss"] = loss.item()
            for key, value in stats.items():
                if key == "ratio_max_dev":  # a max over the minibatch; the others are weighted sums
                    totals[key] = max(totals.get(key, 0.0), value)
                else:
                    totals[key] = totals.get(key, 0.0) + value
        totals["grad_norm"] = self.step()
        return totals

    def train_iteration(self, minibatches: list[Batch]) -> dict[str, float]:
        """`epochs` passes of clipped updates over the minibatches of trained steps (with an `advantage` column).

        One optimiser step per minibatch; under data parallelism each rank gets its slice of every minibatch.
        `nfe/train` counts the transformer forwards this took (old log-probs, loss, reference for KL)."""
        self.forwards = 0
        logp_old = self.old_logprobs(minibatches)
        rollout_mismatch = max(
            (torch.cat(lo).cpu() - mb["logp_old"]).abs().max().item()
            for lo, mb in zip(logp_old, minibatches, strict=True)
        )
        totals: dict[str, float] = {}
        first_ratio_dev = math.nan
        updates = 0
        for _epoch in range(self.train.epochs):
            for mb, lo in zip(minibatches, logp_old, strict=True):
                stats = self.update(mb, lo)
                if updates == 0:
                    first_ratio_dev = stats["ratio_max_dev"]
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                updates += 1
        metrics = {f"train/{k}": v / max(updates, 1) for k, v in totals.items()}
        metrics["train/updates"] = updates
        metrics["train/first_ratio_max_dev"] = first_ratio_dev
        metrics["train/rollout_logp_mismatch"] = rollout_mismatch
        metrics["nfe/train"] = self.forwards
        # rows of weight 0 that equalise the data-parallel ranks' slices (runtime.learner.slice_for_ranks)
        metrics["train/padding_rows"] = sum(int((mb["loss_weight"] == 0).sum()) for mb in minibatches
                                            if "loss_weight" in mb.tensors)
        return metrics
