"""Build the adapter for a provider's `kind`."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from bulwark.config import Provider
from bulwark.http1 import Http1
from bulwark.providers.base import Adapter


def make_adapter(provider: Provider, session: aiohttp.ClientSession, *,
                 retry_after_cap: float, env: Mapping[str, str] | None = None,
                 http1: Http1 | None = None) -> Adapter:
    """`http1`: the lean client for OpenAI-compatible chats (web's hot path); without it,
    every call goes through `session`."""
    # Imported here so that a kind's module loads only when a provider of that kind exists.
    if provider.kind == "openai":
        from bulwark.providers.openai import OpenAIAdapter
        return OpenAIAdapter(provider, session, retry_after_cap=retry_after_cap, env=env,
                             http1=http1)
    if provider.kind == "sim":
        from bulwark.providers.openai import SimAdapter
        return SimAdapter(provider, session, retry_after_cap=retry_after_cap, env=env,
                          http1=http1)
    if provider.kind == "anthropic":
        from bulwark.providers.anthropic import AnthropicAdapter
        return AnthropicAdapter(provider, session, retry_after_cap=retry_after_cap, env=env)
    if provider.kind == "gemini":
        from bulwark.providers.gemini import GeminiAdapter
        return GeminiAdapter(provider, session, retry_after_cap=retry_after_cap, env=env)
    raise ValueError(f"unknown provider kind {provider.kind!r}")
