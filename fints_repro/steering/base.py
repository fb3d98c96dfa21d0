"""The steering plug-in interface: what a method gets (``SteeringInputs``), what it
returns (``SteeringPlan``), the registry of methods (``STEERING``) and the config schema
they make (``steering_schema``). Re-exported by ``fints_repro.steering``."""


from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch

from fints_repro.config import SteeringConfig
from fints_repro.data.schema import Sample
from fints_repro.models.loading import LoadedModel
from fints_repro.preferences.pairs import PairSource
from fints_repro.registry import Registry
from fints_repro.retrieval import Retriever
from fints_repro.steering.hooks import SiteKey, steer


@dataclass(kw_only=True)
class SteeringInputs(PairSource):
    """What a method may use besides the model and the samples: what pairs are made from
    (``PairSource``), the retrievers, and the backbone's per-user model context."""

    retriever: Callable[..., Retriever]  # (name=None): the run's, or a retriever option
    layers_path: str = ""
    # A backbone with per-user adapters (steering.extract_with_adapter): the context to run
    # a forward pass of the given users' rows in (it yields the forward's extra keyword
    # arguments), and what of a user's decides the activations (part of the vector key).
    user_context: Optional[Callable[[list[str]], ContextManager]] = None
    user_identity: Optional[Callable[[str], str]] = None


@dataclass
class SteeringPlan:
    vectors: dict[SiteKey, torch.Tensor]  # (layer, site) -> [n_samples, H]
    steered: list[bool]  # per sample: False = zero vectors (no pairs)
    positions: str = "all"
    layers_path: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    row_info: list[dict[str, Any]] = field(default_factory=list)  # per sample, for predictions.jsonl

    def batch_context(self, model: torch.nn.Module) -> Callable[[list[int]], ContextManager]:
        def ctx(rows: list[int]) -> ContextManager:
            return steer(model, {k: v[rows] for k, v in self.vectors.items()}, self.positions,
                         layers_path=self.layers_path)

        return ctx

    def row_digests(self) -> list[str]:
        """Per sample, a digest of its vectors (part of the generation cache key); "" for
        an unsteered row, whose zero vectors leave the output exactly as without steering."""
        keys = sorted(self.vectors)
        out = []
        for i in range(len(self.steered)):
            if not self.steered[i]:
                out.append("")
                continue
            h = hashlib.sha256(repr((keys, self.positions)).encode())
            for k in keys:
                h.update(self.vectors[k][i].to(torch.float32).cpu().numpy().tobytes())
            out.append(h.hexdigest()[:16])
        return out


SteeringMethod = Callable[
    [SteeringConfig, LoadedModel, Sequence[Sample], SteeringInputs], Optional[SteeringPlan]
]
STEERING: Registry[SteeringMethod] = Registry("steering method",
                                              package="fints_repro.steering.methods")


@STEERING.register("none")
def _no_steering(cfg: SteeringConfig, lm: LoadedModel, samples: Sequence[Sample],
                 inputs: SteeringInputs) -> None:
    return None


def steering_schema() -> type:
    """``SteeringConfig`` with one node per registered method that has settings
    (``steering.caa``, ``steering.bipo``, ...): the type Hydra composes ``steering`` into."""
    return STEERING.schema(SteeringConfig, "fints_repro.steering")
