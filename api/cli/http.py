"""The CLI's connection to a Grove server: where it is, which key, and requests with readable errors.

Configuration, first found wins: the `--base-url` / `--api-key` options, the GROVE_BASE_URL /
GROVE_API_KEY environment variables, the config file (GROVE_CONFIG, else
$XDG_CONFIG_HOME/grove/config.toml, else ~/.config/grove/config.toml, written by `grove configure`), and
last the embedded defaults: http://127.0.0.1:8000 and the key `make run` keeps in ./var/api-key.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
EMBEDDED_KEY_FILE = Path("var/api-key")


def config_path() -> Path:
    if os.environ.get("GROVE_CONFIG"):
        return Path(os.environ["GROVE_CONFIG"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "grove" / "config.toml"


def read_config_file(path: Path | None = None) -> dict[str, str]:
    path = path or config_path()
    if not path.is_file():
        return {}
    with path.open("rb") as f:
        data = tomllib.load(f)
    return {k: str(v) for k, v in data.items() if k in ("base_url", "api_key")}


def write_config_file(values: dict[str, str], path: Path | None = None) -> Path:
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    current = read_config_file(path) | {k: v for k, v in values.items() if v}
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text("".join(f'{k} = "{v}"\n' for k, v in sorted(current.items())))
    return path


@dataclass
class Settings:
    base_url: str
    api_key: str | None
    source: dict[str, str]


def resolve(base_url: str | None = None, api_key: str | None = None) -> Settings:
    file = read_config_file()
    source = {}
    url = base_url or os.environ.get("GROVE_BASE_URL") or file.get("base_url")
    source["base_url"] = "option" if base_url else "env" if os.environ.get("GROVE_BASE_URL") else "config file"
    if not url:
        url, source["base_url"] = DEFAULT_BASE_URL, "default"
    key = api_key or os.environ.get("GROVE_API_KEY") or file.get("api_key")
    source["api_key"] = "option" if api_key else "env" if os.environ.get("GROVE_API_KEY") else "config file"
    if not key and EMBEDDED_KEY_FILE.is_file():
        key, source["api_key"] = EMBEDDED_KEY_FILE.read_text().strip() or None, str(EMBEDDED_KEY_FILE)
    if not key:
        source["api_key"] = "none"
    return Settings(base_url=url.rstrip("/"), api_key=key, source=source)


class ApiError(Exception):
    """A request that did not succeed, with the server's error envelope when it sent one."""

    def __init__(self, message: str, status: int | None = None, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def __str__(self) -> str:
        details = ", ".join(p for p in (f"param: {self.param}" if self.param else "", self.code or "") if p)
        status = f"HTTP {self.status}: " if self.status else ""
        return f"{status}{self.message}" + (f" ({details})" if details else "")


class Client:
    def __init__(self, settings: Settings, timeout: float = 60.0):
        self.settings = settings
        headers = {"user-agent": "grove-cli/0.1"}
        if settings.api_key:
            headers["authorization"] = f"Bearer {settings.api_key}"
        self.http = httpx.Client(base_url=settings.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    @staticmethod
    def raise_for(response: httpx.Response) -> None:
        if response.is_success or response.status_code == 206:
            return
        try:
            error = response.json()["error"]
            raise ApiError(
                error.get("message", response.reason_phrase),
                response.status_code,
                error.get("param"),
                error.get("code"),
            )
        except (ValueError, KeyError, TypeError):
            raise ApiError(response.text[:300] or response.reason_phrase, response.status_code) from None

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach {self.settings.base_url}: {exc.__class__.__name__}: {exc}") from None
        self.raise_for(response)
        return response

    def get(self, path: str, **params: Any) -> dict:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post(self, path: str, json: dict | None = None, **kwargs) -> dict:
        return self.request("POST", path, json=json, **kwargs).json()

    def delete(self, path: str) -> dict:
        return self.request("DELETE", path).json()
