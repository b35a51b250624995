"""API: chat completions through any OpenAI-compatible endpoint, with retries, a stop on fatal errors, and cost.

Rate limits (429), server errors (5xx), timeouts and dropped connections are retried by the openai client
itself (capped exponential backoff that honours Retry-After); we count the retries. A bad key, a refused permission or an unknown model stops at once with one
line (FatalAPIError): retrying those only burns time. The key is the client's business: it is read by the
openai client from OPENAI_API_KEY or passed in, and never printed or written.
"""

import asyncio
import re
from dataclasses import dataclass, field

from .errors import first_line

# US dollars per 1,000 tokens (input, output), from the providers' price pages; --price_per_1k_* overrides.
PRICES_PER_1K = {
    "gpt-4o-mini": (0.00015, 0.0006),
    "gpt-4o": (0.0025, 0.01),
    "gpt-4.1": (0.002, 0.008),
    "gpt-4.1-mini": (0.0004, 0.0016),
    "gpt-4.1-nano": (0.0001, 0.0004),
    "gpt-3.5-turbo": (0.0005, 0.0015),
}


_SECRET = re.compile(r"(?i)bearer\s+\S+|\bsk-[A-Za-z0-9_-]{6,}")


class RetriesExhausted(Exception):
    """A request whose attempts took longer than max_retry_seconds in all."""


class FatalAPIError(ValueError):
    """An error no retry can fix (authentication, permission, unknown model, missing key): the command line
    shows it as its one-line error, like any other bad input."""


@dataclass
class Spend:
    """Tokens and dollars so far; `limit_usd` 0 means no limit."""

    price_in: float | None
    price_out: float | None
    limit_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0

    @property
    def usd(self) -> float | None:
        if self.price_in is None or self.price_out is None:
            return None
        return (self.input_tokens * self.price_in + self.output_tokens * self.price_out) / 1000

    @property
    def exhausted(self) -> bool:
        return bool(self.limit_usd) and (self.usd or 0.0) >= self.limit_usd

    def add(self, usage) -> None:
        self.requests += 1
        if usage is not None:
            self.input_tokens += usage.prompt_tokens or 0
            self.output_tokens += usage.completion_tokens or 0

    def to_dict(self) -> dict:
        return {"requests": self.requests, "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "usd": self.usd, "limit_usd": self.limit_usd or None}


def make_spend(model: str, price_per_1k_input: float | None, price_per_1k_output: float | None,
               max_cost_usd: float) -> Spend:
    known = PRICES_PER_1K.get(model, (None, None))
    price_in = price_per_1k_input if price_per_1k_input is not None else known[0]
    price_out = price_per_1k_output if price_per_1k_output is not None else known[1]
    if max_cost_usd and (price_in is None or price_out is None):
        raise ValueError(f"--max_cost_usd {max_cost_usd}: no price is known for model {model!r}; "
                         "pass --price_per_1k_input and --price_per_1k_output")
    return Spend(price_in, price_out, max_cost_usd or 0.0)


@dataclass
class Client:
    """An AsyncOpenAI client that retries as the module says, and counts its retries by reason."""

    model: str
    base_url: str = ""
    api_key: str | None = None
    timeout: float = 60.0
    max_retries: int = 8
    max_retry_seconds: float = 300.0  # a request's attempts and waits together: the openai client sets no such cap
    retries: dict = field(default_factory=dict)  # reason -> failed attempts, for the summary

    def __post_init__(self):
        import httpx2
        import openai

        # the openai client retries 408/409/429/5xx, timeouts and dropped connections itself, with capped
        # exponential backoff that honours Retry-After; the transport below only counts what it retried
        transport = _CountingTransport(httpx2.AsyncHTTPTransport(), self.retries)
        try:
            self._client = openai.AsyncOpenAI(base_url=self.base_url or None, api_key=self.api_key,
                                              timeout=self.timeout, max_retries=self.max_retries,
                                              http_client=openai.DefaultAsyncHttpxClient(transport=transport))
        except openai.OpenAIError:
            raise FatalAPIError("no API key: set OPENAI_API_KEY (any value for a local server that ignores it)") from None

    async def chat(self, messages: list[dict], **parameters):
        """One chat completion. Returns the openai response object; raises FatalAPIError for what no retry can fix,
        and the openai client's own error once its retries are spent."""
        import openai

        try:
            return await asyncio.wait_for(
                self._client.chat.completions.create(model=self.model, messages=messages, **parameters),
                self.max_retry_seconds)
        except asyncio.TimeoutError:
            raise RetriesExhausted(f"no answer in {self.max_retry_seconds:g} s of attempts") from None
        except openai.AuthenticationError:
            raise FatalAPIError("the API key was refused (401): check OPENAI_API_KEY") from None
        except openai.PermissionDeniedError:
            raise FatalAPIError(f"permission denied (403) for model {self.model!r}") from None
        except openai.NotFoundError:
            raise FatalAPIError(f"model {self.model!r} not found at {self.base_url or 'api.openai.com'} (404)") from None
        except openai.APIStatusError as error:
            if error.status_code >= 500 or error.status_code in (408, 409, 429):
                raise  # retried until the retries ran out: the caller counts the request as failed
            raise FatalAPIError(f"the API refused the request ({error.status_code}): "
                                f"{self.redact(str(error.message))[:200]}") from None

    def redact(self, text: str) -> str:
        """`text` without the API key, however an API's error message echoes it."""
        key = self._client.api_key if isinstance(self._client.api_key, str) else ""
        if len(key) >= 4:
            text = text.replace(key, "[redacted]")
        return _SECRET.sub("[redacted]", text)

    def stop_if_every_request_failed(self, results: list) -> None:
        """A batch in which every request failed after its retries: the API is down, or refuses everything. Stop
        with one line rather than go on sending, or report an empty result as if all went well."""
        failures = [r for r in results if isinstance(r, BaseException)]
        if results and len(failures) == len(results):
            last = failures[-1]
            reason = self.redact(first_line(last))
            raise FatalAPIError(f"every request of a batch failed after {self.max_retries} retries each "
                                f"({type(last).__name__}: {reason}): the API at "
                                f"{self.base_url or 'api.openai.com'} is not answering; what was done so far is kept, "
                                "and a rerun resumes")

    async def close(self):
        await self._client.close()


class _CountingTransport:
    """The HTTP transport the openai client sends through, counting each failed attempt by the error the
    client makes of it (the retries, and the last failure when they run out)."""

    def __init__(self, transport, counts: dict):
        self._transport, self._counts = transport, counts

    async def handle_async_request(self, request):
        import httpx2

        try:
            response = await self._transport.handle_async_request(request)
        except httpx2.TimeoutException:
            self._count("APITimeoutError")
            raise
        except httpx2.TransportError:
            self._count("APIConnectionError")
            raise
        if response.status_code == 429:
            self._count("RateLimitError")
        elif response.status_code >= 500:
            self._count("InternalServerError")
        elif response.status_code in (408, 409):
            self._count(str(response.status_code))
        return response

    def _count(self, reason: str) -> None:
        self._counts[reason] = self._counts.get(reason, 0) + 1

    async def aclose(self):
        await self._transport.aclose()
