"""The API server's fast paths: uvicorn's defaults (--loop auto, --http auto) pick uvloop and httptools when
they are installed, and the lock installs them. Without them status polling serves about a third of the
requests/s (docs/RELIABILITY.md, Load)."""

from __future__ import annotations

import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def test_uvicorn_defaults_pick_uvloop_and_httptools():
    config = Config("api.main:app")
    assert (config.loop, config.http) == ("auto", "auto")
    loop = config.get_loop_factory()()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    assert AutoHTTPProtocol is HttpToolsProtocol
