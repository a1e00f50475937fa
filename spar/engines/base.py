"""The one Tinker-shaped interface every training/sampling backend implements.

It is the subset of the `tinker` SDK that spar uses, with the SDK's own types (`tinker.Datum`,
`tinker.ModelInput`, `tinker.SamplingParams`, `tinker.AdamParams`): calls return futures with
`.result()`, sampling always goes through a sampling client made from a saved sampler path, and a
training run resumes from a saved state through `create_training_client_from_state_with_optimizer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # tinker imports torch: keep it off the `spar plan` path
    import tinker


class Future(Protocol):
    def result(self, timeout: float | None = None) -> Any: ...


class TrainingClient(Protocol):
    def forward_backward(self, data: list[tinker.Datum], loss_fn: str) -> Future:
        """Result has `loss_fn_outputs`: one dict per datum with a `logprobs` TensorData."""
        ...

    def forward(self, data: list[tinker.Datum], loss_fn: str) -> Future:
        """`forward_backward`'s outputs without a gradient (held-out evaluation)."""
        ...

    def optim_step(self, adam_params: tinker.AdamParams) -> Future: ...

    def save_state(self, name: str) -> Future:
        """Result has `.path`: a resumable training state."""
        ...

    def save_weights_for_sampler(self, name: str) -> Future:
        """Result has `.path`: what `create_sampling_client(model_path=...)` takes."""
        ...


class SamplingClient(Protocol):
    def sample(
        self, prompt: tinker.ModelInput, num_samples: int, sampling_params: tinker.SamplingParams
    ) -> Future:
        """Result has `.sequences`, each with `.tokens`."""
        ...

    def compute_logprobs(self, prompt: tinker.ModelInput) -> Future:
        """Result: the log-probability of every token of `prompt` given the tokens before it,
        a list as long as the prompt whose first entry is None (the Tinker SDK's method; skyrl's
        server leaves that first entry out)."""
        ...


class Engine(Protocol):
    def create_lora_training_client(
        self, base_model: str, rank: int, seed: int | None = None
    ) -> TrainingClient: ...

    def create_training_client_from_state_with_optimizer(
        self, path: str, base_model: str | None = None
    ) -> TrainingClient:
        """A training client resuming a `save_state` path: adapter weights and Adam state."""
        ...

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> SamplingClient: ...


class EngineFactory(Protocol):
    def __call__(self, workdir: Path) -> Engine:
        """`workdir`: where a local engine may keep checkpoints (under runs/.spar/)."""
        ...
