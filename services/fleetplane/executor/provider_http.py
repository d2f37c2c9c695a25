"""Model calls straight over HTTP: the Anthropic Messages and OpenAI Chat Completions requests
the SDKs send, posted with one shared aiohttp session and read as plain JSON.

Why not the SDKs (issue 15, stop 22; docs/executor.md): per call they build a request model,
transform the parameters (openai's `async_maybe_transform` walks every message), merge headers,
wrap aiohttp in their httpx2 shim and build a pydantic response model, about half of the
executor's Python CPU in a burst of one-call tasks. The executor reads five fields of the
answer; here the request is one `orjson.dumps`, the answer one `orjson.loads`.

Errors keep the SDKs' classes (`models.classify`): a non-2xx answer is a `ProviderStatusError`
with its status and headers (`retry-after`); a read or connect timeout is a `TimeoutError`; a
lost connection an `aiohttp.ClientError`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

#: the Messages API version the anthropic SDK sends
ANTHROPIC_VERSION = "2023-06-01"


class ProviderStatusError(Exception):
    """The provider answered with a non-2xx status."""

    def __init__(self, api: str, status_code: int, body: str,
                 headers: Mapping[str, str]) -> None:
        super().__init__(f"Error code: {status_code} - {body[:1000]}")
        self.api = api
        self.status_code = status_code
        self.headers = headers


class ProviderHTTP:
    """One aiohttp session for every call of the process's model-calls loop (created on that
    loop at the first call). No connection limit: a call waits for its model, never for a
    connection; idle connections are kept for the next calls."""

    def __init__(self, anthropic_base_url: str, anthropic_api_key: str,
                 openai_base_url: str, openai_api_key: str) -> None:
        self._anthropic_url = anthropic_base_url.rstrip("/") + "/v1/messages"
        self._anthropic_headers = {"x-api-key": anthropic_api_key,
                                   "anthropic-version": ANTHROPIC_VERSION,
                                   "content-type": "application/json"}
        self._openai_url = openai_base_url.rstrip("/") + "/chat/completions"
        self._openai_headers = {"authorization": f"Bearer {openai_api_key}",
                                "content-type": "application/json"}
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
                cookie_jar=aiohttp.DummyCookieJar(),  # no state carried from call to call
                skip_auto_headers=("User-Agent",))
        return self._session

    def _timeout(self, timeout_s: float) -> aiohttp.ClientTimeout:
        """As the SDKs' httpx timeout: `timeout_s` to connect and between reads, no total."""
        t = self._timeouts.get(timeout_s)
        if t is None:
            t = self._timeouts[timeout_s] = aiohttp.ClientTimeout(
                total=None, sock_connect=timeout_s, sock_read=timeout_s)
        return t

    async def anthropic_messages(self, body: dict[str, Any], timeout_s: float,
                                 extra_headers: dict[str, str] | None) -> dict[str, Any]:
        headers = ({**self._anthropic_headers, **extra_headers} if extra_headers
                   else self._anthropic_headers)
        return await self._post("anthropic", self._anthropic_url, headers, body, timeout_s)

    async def openai_chat(self, body: dict[str, Any], timeout_s: float,
                          extra_headers: dict[str, str] | None) -> dict[str, Any]:
        headers = ({**self._openai_headers, **extra_headers} if extra_headers
                   else self._openai_headers)
        return await self._post("openai", self._openai_url, headers, body, timeout_s)

    async def _post(self, api: str, url: str, headers: dict[str, str], body: dict[str, Any],
                    timeout_s: float) -> dict[str, Any]:
        async with self._client().post(url, data=orjson.dumps(body), headers=headers,
                                       timeout=self._timeout(timeout_s)) as resp:
            raw = await resp.read()
            if resp.status >= 300:
                raise ProviderStatusError(api, resp.status, raw.decode("utf-8", "replace"),
                                          resp.headers)
        answer: dict[str, Any] = orjson.loads(raw)
        return answer

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
