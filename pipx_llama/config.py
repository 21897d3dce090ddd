"""User configuration: the config file, environment variables and their precedence.

Precedence, highest first: command-line flags (applied by the CLI), environment variables, the config
file ``<config dir>/config.toml``, defaults. The config dir is ``platformdirs.user_config_dir("pipx-llama")``
(override: ``PIPX_LLAMA_CONFIG_DIR``); it may also hold a ``manifests/`` folder of the user's own manifests.

Environment: ``PIPX_LLAMA_HOME`` (store root), ``PIPX_LLAMA_MIRROR`` (mirror base URLs or folders,
separated by whitespace or commas), ``PIPX_LLAMA_OFFLINE=1``, ``PIPX_LLAMA_URL`` (the URL for
``url-template`` sources, e.g. Meta's presigned URL), ``PIPX_LLAMA_TOKEN`` (bearer token for any https
source), ``HF_TOKEN`` (bearer token sent to Hugging Face only) and ``PIPX_LLAMA_REGISTRY`` (the OCI
registry of references that name none; config key ``registry``). Registry credentials come from the
config's ``[registry_credentials]`` table (``"host:port" = "user:password"``), else Docker's
``config.json``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from pipx_llama.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

APP = "pipx-llama"
_KEYS = {"home": str, "mirrors": list, "offline": bool, "allow_http": bool, "parallel_parts": int,
         "part_threshold": int, "give_up_after": float, "registry": str, "registry_credentials": dict}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


@dataclass
class Config:
    home: Path
    config_dir: Path
    mirrors: list[str] = field(default_factory=list)
    offline: bool = False
    allow_http: bool = False
    url: str | None = None
    token: str | None = None
    hf_token: str | None = None
    parallel_parts: int | None = None
    part_threshold: int | None = None
    give_up_after: float | None = None   # seconds without a byte from a source before a download gives up
    registry: str = "registry.ollama.ai"  # the OCI registry of references that name none
    registry_credentials: dict[str, str] = field(default_factory=dict)  # registry host -> "user:password"

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def user_manifest_dirs(self) -> list[Path]:
        """The user's own manifests, and those ``import`` registered in the store."""
        return [self.config_dir / "manifests", self.home / "manifests"]


def env_flag(env: Mapping[str, str], name: str) -> bool | None:
    value = env.get(name)
    if value is None:
        return None
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"environment variable {name}={value!r} is not a yes/no value", "use 1 or 0")


def split_mirrors(value: str) -> list[str]:
    return [m for m in value.replace(",", " ").split() if m]


def default_config_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("PIPX_LLAMA_CONFIG_DIR") or platformdirs.user_config_dir(APP))


def _read_file(path: Path) -> dict:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read the config file {path}: {err}", "fix or remove it") from None
    for key, value in data.items():
        kind = _KEYS.get(key)
        if kind is None:
            raise ConfigError(f"{path}: unknown key {key!r}", f"allowed keys: {', '.join(sorted(_KEYS))}")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = data[key] = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            what = "number" if kind is float else kind.__name__
            raise ConfigError(f"{path}: {key} must be a {what}, got {value!r}", "fix the config file")
        if kind is float and not 0 < value < float("inf"):
            raise ConfigError(f"{path}: {key} must be a positive number of seconds, got {value!r}",
                              "fix the config file")
        if kind is list and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: {key} must be a list of strings", "fix the config file")
        if kind is dict and not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{path}: {key} must be a table of strings", "fix the config file")
    return data


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """The configuration from the config file and the environment (flags are the caller's to apply)."""
    env = os.environ if env is None else env
    config_dir = default_config_dir(env)
    data = _read_file(config_dir / "config.toml")
    home = env.get("PIPX_LLAMA_HOME") or data.get("home") or platformdirs.user_data_dir(APP)
    mirrors = split_mirrors(env.get("PIPX_LLAMA_MIRROR", "")) + list(data.get("mirrors", []))
    offline = env_flag(env, "PIPX_LLAMA_OFFLINE")
    return Config(
        home=Path(home).expanduser(),
        config_dir=config_dir,
        mirrors=list(dict.fromkeys(mirrors)),
        offline=bool(data.get("offline", False)) if offline is None else offline,
        allow_http=bool(data.get("allow_http", False)),
        url=env.get("PIPX_LLAMA_URL") or None,
        token=env.get("PIPX_LLAMA_TOKEN") or None,
        hf_token=env.get("HF_TOKEN") or None,
        parallel_parts=data.get("parallel_parts"),
        part_threshold=data.get("part_threshold"),
        give_up_after=data.get("give_up_after"),
        registry=env.get("PIPX_LLAMA_REGISTRY") or data.get("registry") or "registry.ollama.ai",
        registry_credentials=dict(data.get("registry_credentials", {})),
    )
