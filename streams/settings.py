"""Process settings (environment, ``SWITCHBOARD_`` prefix) and the YAML config loader.

The environment is read here and nowhere else (STYLE.md §3); everything downstream receives a
``Settings`` or a ``SwitchboardConfig`` as an explicit argument.
"""

from __future__ import annotations

import os
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from processors.config import SwitchboardConfig

__all__ = ["ConfigError", "Settings", "Topics", "default_config_path", "load_config"]


class ConfigError(Exception):
    """The configuration file is missing, not YAML, or does not match the expected shape."""


def default_config_path() -> Path:
    """Return the path of the bundled default config (``streams/data/switchboard.yaml``)."""
    return Path(str(resources.files("streams").joinpath("data/switchboard.yaml")))


class Topics:
    """The topic names of one deployment, all under one prefix (``switchboard.`` by default)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.inbound = f"{prefix}.inbound"
        self.conversations = f"{prefix}.conversations"
        self.llm_requests = f"{prefix}.llm.requests"
        self.llm_responses = f"{prefix}.llm.responses"
        self.delivery_requests = f"{prefix}.delivery.requests"
        self.delivery_reports = f"{prefix}.delivery.reports"
        self.deadletter = f"{prefix}.deadletter"
        self.handoff = f"{prefix}.handoff"
        self.analytics = f"{prefix}.conversation.analytics"

    def all(self) -> list[str]:
        """Every topic the pipeline reads or writes, in flow order."""
        return [
            self.inbound,
            self.conversations,
            self.llm_requests,
            self.llm_responses,
            self.delivery_requests,
            self.delivery_reports,
            self.deadletter,
            self.handoff,
            self.analytics,
        ]


class Settings(BaseSettings):
    """Everything a process needs from its environment. Frozen; build once at the entry point."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_", frozen=True, extra="ignore")

    kafka_brokers: str = Field(
        "127.0.0.1:9092", description="Comma-separated bootstrap servers (host:port)."
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL (redis://…).")
    schema_registry_url: str | None = Field(
        None,
        description="Confluent-compatible Schema Registry; unset = Avro single-object encoding.",
    )
    config: Path | None = Field(None, description="YAML file of personas and routing rules.")
    app_id: str = Field(
        "switchboard",
        description="App id: consumer groups are <app_id>.<stage>; prefixes the changelog.",
    )
    topic_prefix: str = Field("switchboard", description="Prefix of every topic name.")
    partitions: int = Field(4, ge=1, description="Partitions of each topic created by us.")
    metrics_port: int = Field(9108, ge=0, description="Port of the /metrics endpoint (0 = off).")
    session_timeout_s: float = Field(
        10.0, gt=0, description="Consumer group session timeout (s); 6 in the embedded stack."
    )
    single_record_batches: bool = Field(
        False,
        description=(
            "Produce one record per batch, for tools that read end offsets on a broker whose "
            "ListOffsets answers the base offset of the newest batch (Tansu); the table restore "
            "does not need it. Slows producing a lot."
        ),
    )
    fetch_max_wait_ms: int | None = Field(
        None,
        ge=1,
        description=(
            "Longest a consumer fetch waits for data (ms); None = 100. Keep it low on "
            "brokers that do not answer a waiting fetch when data arrives (Tansu with several "
            "partitions per fetch)."
        ),
    )
    reuse_encoded_records: int = Field(
        8192,
        ge=0,
        description=(
            "Records the worker produced for its own stages that it keeps, by their bytes, so "
            "that consuming one of them again skips decoding it (schemas.codec.Codec, "
            "remember); 0 = off. At most 4 MiB of encoded records are kept (about twice that "
            "in memory); ~1.3 KB a record of the default workload."
        ),
    )
    worker_id: str | None = Field(
        None,
        description=(
            "This worker's name in its consumer groups (e.g. the pod name). Partitions are "
            "assigned over the workers in the order of their names, so each worker gets the "
            "same partition numbers in every stage (streams.assignor); a stable name gives a "
            "restarted worker its partitions back. Unset = <hostname>:<pid>."
        ),
    )
    data_dir: Path = Field(Path("var"), description="Table stores and outbox files live here.")
    openai_api_key: SecretStr | None = Field(None, alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(None, alias="OPENAI_BASE_URL")
    log_level: str = "INFO"
    log_format: Literal["console", "json"] = "console"

    @cached_property
    def topics(self) -> Topics:
        """Topic names under ``topic_prefix``."""
        return Topics(self.topic_prefix)

    def engine_env(self) -> dict[str, str]:
        """The variables LLM engines read: OPENAI_API_KEY / OPENAI_BASE_URL and any other
        ``api_key_env`` a config names (read here, at the edge, like every other setting)."""
        env = {k: v for k, v in os.environ.items() if k.endswith(("_API_KEY", "_BASE_URL"))}
        if self.openai_api_key is not None:
            env["OPENAI_API_KEY"] = self.openai_api_key.get_secret_value()
        if self.openai_base_url is not None:
            env["OPENAI_BASE_URL"] = self.openai_base_url
        return env

    def to_env(self) -> dict[str, str]:
        """These settings as ``SWITCHBOARD_*`` variables, to hand to a child process (unset
        fields and the OpenAI variables, which have their own names, are left out)."""
        env: dict[str, str] = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if value is None or info.alias is not None:
                continue
            text = str(value).lower() if isinstance(value, bool) else str(value)
            env[f"SWITCHBOARD_{name.upper()}"] = text
        return env

    def broker_list(self) -> list[str]:
        """``kafka_brokers`` split into host:port entries."""
        return [b.strip() for b in self.kafka_brokers.split(",") if b.strip()]

    def config_path(self) -> Path:
        """The YAML config in force: ``SWITCHBOARD_CONFIG`` or the bundled default."""
        return self.config if self.config is not None else default_config_path()


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def load_config(path: Path) -> SwitchboardConfig:
    """Read and validate the YAML config.

    Args:
        path: The YAML file.

    Returns:
        The validated config.

    Raises:
        ConfigError: naming the file, each offending field and what was expected.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        config = SwitchboardConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: invalid configuration ({exc.error_count()} error(s)):"]
        for err in exc.errors(include_url=False):
            lines.append(f"  {_location(err['loc'])}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    _check_registered_names(path, config)
    return config


def _check_registered_names(path: Path, config: SwitchboardConfig) -> None:
    """Fail on custom rules or content filters that no code registered."""
    from processors import preprocess, router

    known_rules = set(router.registered_rules())
    for rule in config.routing.rules:
        if rule.custom is not None and rule.custom not in known_rules:
            raise ConfigError(
                f"{path}: routing.rules[{rule.name}].custom: unknown custom rule "
                f"{rule.custom!r} (registered: {sorted(known_rules)})"
            )
    for name in config.preprocess.content_filters:
        try:
            preprocess.content_filter(name)
        except KeyError:
            raise ConfigError(
                f"{path}: preprocess.content_filters: unknown content filter {name!r}"
            ) from None
