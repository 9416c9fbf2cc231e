"""Sandbox settings: latencies, auth, webhook signing and strictness switches."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from typing import Annotated

import msgspec

BASE_PROCESSORS = (
    "lite",
    "base",
    "core",
    "core2x",
    "pro",
    "ultra",
    "ultra2x",
    "ultra4x",
    "ultra8x",
)
PROCESSORS = frozenset(BASE_PROCESSORS + tuple(f"{p}-fast" for p in BASE_PROCESSORS))
# Never shown by GET /_sandbox/config (nor by PATCH's answer).
SECRET_FIELDS = ("api_key", "webhook_secret", "control_token")


class ExposedWithoutToken(ValueError):
    """The sandbox would listen beyond loopback with an open control API."""


def secret_fingerprint(secret: str) -> str:
    """The SHA-256 of a secret, in hex: comparable, not reversible."""
    return hashlib.sha256(secret.encode()).hexdigest()


class SandboxConfig(msgspec.Struct, kw_only=True):
    # None accepts any non-empty x-api-key; a value requires exactly that key.
    api_key: str | None = None
    # Total run time (creation to terminal) per processor; "-fast" falls back to its base name.
    latency_s: dict[str, float] = {}
    default_latency_s: float = 0.3
    queued_s: float = 0.05
    webhook_secret: str = "sandbox_webhook_secret"
    # Bearer token for /_sandbox/* (health excepted). Without one, the control API answers
    # loopback callers only, and the sandbox refuses to listen on any other address.
    control_token: str | None = None
    webhook_retry_base_s: float = 5.0
    webhook_max_attempts: int = 5
    webhook_timeout_s: float = 10.0
    webhook_concurrency: int = 32
    # Unknown previous_interaction_id: 422 when True, accepted (no context) when False.
    strict_interactions: bool = False
    # What a create naming an expired interaction is answered (Parallel documents no code of its
    # own for it; 422 is its answer to an invalid create).
    expired_interaction_status: Annotated[int, msgspec.Meta(ge=400, le=499)] = 422
    # False: interaction ids ("intr_…") differ from run ids, catching clients that chain by run_id.
    interaction_id_equals_run_id: bool = False
    # Webhook on create without `parallel-beta: webhook-2025-08-12` → 422 when True.
    strict_betas: bool = False
    max_result_timeout_s: float = 600
    # Progress tick of the SSE stream; None scales it with the run's latency (0.1 s to 2 s).
    events_interval_s: float | None = None
    events_max_s: float = 570
    # Task groups (sandbox/groups.py): False answers their routes 404, as a deployment without them.
    task_groups: bool = True
    group_events_max_s: float = 3600  # Parallel keeps a group's event stream open up to an hour
    # Cap on the call and webhook-attempt logs kept for /_sandbox/calls and /_sandbox/webhooks.
    max_log_entries: int = 200_000

    @classmethod
    def from_env(cls) -> SandboxConfig:
        """Read SANDBOX_API_KEY, SANDBOX_LATENCY_S, SANDBOX_WEBHOOK_SECRET and optional extras.

        SANDBOX_PROCESSOR_LATENCY_S takes "lite=2,core=10"; SANDBOX_QUEUED_S a float;
        SANDBOX_STRICT_INTERACTIONS "1"/"true"; SANDBOX_TASK_GROUPS "on" (default) or "off".
        """
        env = os.environ
        cfg = cls()
        if key := env.get("SANDBOX_API_KEY"):
            cfg.api_key = key
        if lat := env.get("SANDBOX_LATENCY_S"):
            cfg.default_latency_s = float(lat)
        if secret := env.get("SANDBOX_WEBHOOK_SECRET"):
            cfg.webhook_secret = secret
        if token := env.get("SANDBOX_CONTROL_TOKEN"):
            cfg.control_token = token
        if queued := env.get("SANDBOX_QUEUED_S"):
            cfg.queued_s = float(queued)
        if per := env.get("SANDBOX_PROCESSOR_LATENCY_S"):
            for item in per.split(","):
                name, _, value = item.partition("=")
                cfg.latency_s[name.strip()] = float(value)
        if env.get("SANDBOX_STRICT_INTERACTIONS", "").lower() in ("1", "true", "yes"):
            cfg.strict_interactions = True
        if (groups := env.get("SANDBOX_TASK_GROUPS", "on").lower()) not in ("on", "off"):
            raise ValueError(f"SANDBOX_TASK_GROUPS must be on or off, not {groups!r}")
        cfg.task_groups = groups == "on"
        return cfg

    def public(self) -> dict[str, object]:
        """The settings as /_sandbox/config shows them: secrets left out, only whether set."""
        shown = {k: v for k, v in msgspec.structs.asdict(self).items() if k not in SECRET_FIELDS}
        shown["api_key_required"] = self.api_key is not None
        shown["control_token_required"] = self.control_token is not None
        # Lets a client check the secret it holds (service/dev.py) without the secret being shown.
        shown["webhook_secret_sha256"] = secret_fingerprint(self.webhook_secret)
        return shown

    def check_exposure(self, host: str) -> None:
        """Refuse to serve on a non-loopback address without a control token.

        Raises ExposedWithoutToken.
        """
        if self.control_token is None and not is_loopback(host):
            raise ExposedWithoutToken(
                f"the sandbox would listen on {host!r} with its control API (/_sandbox/*: runs "
                "and their inputs, faults, settings) open to anyone who reaches it: set "
                "SANDBOX_CONTROL_TOKEN, or listen on 127.0.0.1"
            )

    def latency_for(self, processor: str) -> float:
        if processor in self.latency_s:
            return self.latency_s[processor]
        base = processor.removesuffix("-fast")
        return self.latency_s.get(base, self.default_latency_s)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address, or "localhost") is loopback only; other names count as not."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
