"""Environment for child processes of the service (the API, the worker) that tests and benchmarks
start: shared here so that neither imports the other."""

from __future__ import annotations

import os

from service.config import Settings


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes Settings.from_env() rebuild `settings` in a child process."""
    env = dict(os.environ)
    for name in settings.__struct_fields__:
        value = getattr(settings, name)
        if value is None:
            env.pop(name.upper(), None)
        elif isinstance(value, list):
            env[name.upper()] = ",".join(map(str, value))
        else:
            env[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    env["LOG_FORMAT"] = "json"
    env.update(extra)
    return env
