"""engine `tinker`: the Tinker service (or any Tinker-compatible server) through the `tinker` SDK.

The service comes from the SDK's own settings: `TINKER_BASE_URL` (default: Thinking Machines'
production service) and `TINKER_API_KEY`. Before the first client, one health request with a short
timeout makes an unreachable service a one-line error in seconds (the SDK itself would retry it
for minutes). Training clients are the SDK's own `TrainingClient`s; every sampling client is a
fresh `SamplingClient` made from a saved sampler path (`tinker://...`) or from the base model.

Resuming a saved state uses `ServiceClient.create_training_client_from_state_with_optimizer`.
A server that does not take that one-request form (it answers 400/404/405/422; e.g. self-hosted
servers that implement the older protocol) gets the older sequence instead: a new LoRA client of
the state's base model and rank, then `load_state_with_optimizer` as its first request.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spar.errors import RunError

if TYPE_CHECKING:
    import tinker

log = logging.getLogger(__name__)

HEALTH_PATH = "/api/v1/healthz"  # what the SDK's `service.health_check()` asks
HEALTH_TIMEOUT_S = 5.0
OLD_PROTOCOL_STATUS = frozenset({400, 404, 405, 422})  # "I don't know that request"


def base_url() -> str:
    from tinker.lib.base_url import resolve_base_url

    return resolve_base_url()


def check_health(url: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """One GET of the service's health endpoint; RunError (one line) unless it answers.

    Any answer below 500 counts as reachable (a service may want a key even for this); a
    connection failure, a timeout or a 5xx does not.
    """
    import httpx

    target = url + HEALTH_PATH
    try:
        response = httpx.get(target, timeout=timeout, follow_redirects=True)
    except httpx.TimeoutException:
        raise RunError(
            f"engine tinker: no answer from {target} within {timeout:g} s "
            "(is the service up? TINKER_BASE_URL sets where it is)"
        ) from None
    except httpx.HTTPError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RunError(
            f"engine tinker: cannot reach {target}: {reason} "
            "(is the service up? TINKER_BASE_URL sets where it is)"
        ) from None
    if response.status_code >= 500:
        raise RunError(f"engine tinker: {target} answered HTTP {response.status_code}")


def _one_line(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class _DropDeprecationLog(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "load_state*() is deprecated" not in record.getMessage()


class TinkerEngine:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir  # unused: the service keeps the checkpoints
        self._service: tinker.ServiceClient | None = None

    def service(self) -> tinker.ServiceClient:
        if self._service is None:
            import tinker

            url = base_url()
            check_health(url)
            self._service = tinker.ServiceClient(base_url=url)
        return self._service

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """`fn()`, with the SDK's errors as one line naming the service and what failed."""
        import tinker

        try:
            return fn()
        except tinker.TinkerError as e:
            raise RunError(f"engine tinker: {base_url()}: {what}: {_one_line(e)}") from e

    def create_lora_training_client(
        self, base_model: str, rank: int, seed: int | None = None
    ) -> tinker.TrainingClient:
        service = self.service()
        return self._call(
            f"LoRA training client for {base_model}",
            lambda: service.create_lora_training_client(base_model, rank=rank, seed=seed).result(),
        )

    def create_training_client_from_state_with_optimizer(
        self, path: str, base_model: str | None = None
    ) -> tinker.TrainingClient:
        import tinker

        service = self.service()
        try:
            return service.create_training_client_from_state_with_optimizer(
                path, base_model=base_model
            ).result()
        except tinker.APIStatusError as e:
            if e.status_code not in OLD_PROTOCOL_STATUS:
                raise RunError(
                    f"engine tinker: {base_url()}: loading {path}: {_one_line(e)}"
                ) from e
            log.info("%s: HTTP %d to a load into a new client: load_state", path, e.status_code)
        except tinker.TinkerError as e:
            raise RunError(f"engine tinker: {base_url()}: loading {path}: {_one_line(e)}") from e
        rest = tinker.RestClient(base_url=base_url())
        info = self._call(
            f"weights info of {path}", lambda: rest.get_weights_info_by_tinker_path(path).result()
        )
        client = self.create_lora_training_client(
            base_model or info.base_model, rank=int(info.lora_rank)
        )
        sdk_log = logging.getLogger("tinker.lib.public_interfaces.training_client")
        quiet = _DropDeprecationLog()
        sdk_log.addFilter(quiet)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self._call(
                    f"loading {path}", lambda: client.load_state_with_optimizer(path).result()
                )
        finally:
            sdk_log.removeFilter(quiet)
        return client

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> tinker.SamplingClient:
        if model_path is None and base_model is None:
            raise RunError("engine tinker: a sampling client needs model_path or base_model")
        service = self.service()
        return self._call(
            f"sampling client for {model_path or base_model}",
            lambda: service.create_sampling_client(
                model_path=model_path, base_model=base_model
            ).result(),
        )
