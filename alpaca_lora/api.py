"""API: chat completions through any OpenAI-compatible endpoint, with retries, a stop on fatal errors, and cost.

Rate limits (429), server errors (5xx), timeouts and dropped connections are retried with capped exponential
backoff that honours Retry-After. A bad key, a refused permission or an unknown model stops at once with one
line (FatalAPIError): retrying those only burns time. The key is the client's business: it is read by the
openai client from OPENAI_API_KEY or passed in, and never printed or written.
"""

import asyncio
import random
from dataclasses import dataclass, field

# US dollars per 1,000 tokens (input, output), from the providers' price pages; --price_per_1k_* overrides.
PRICES_PER_1K = {
    "gpt-4o-mini": (0.00015, 0.0006),
    "gpt-4o": (0.0025, 0.01),
    "gpt-4.1": (0.002, 0.008),
    "gpt-4.1-mini": (0.0004, 0.0016),
    "gpt-4.1-nano": (0.0001, 0.0004),
    "gpt-3.5-turbo": (0.0005, 0.0015),
}


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
    """An AsyncOpenAI client and the retry policy around it."""

    model: str
    base_url: str = ""
    api_key: str | None = None
    timeout: float = 60.0
    max_retries: int = 8
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0
    retries: dict = field(default_factory=dict)  # reason -> count, for the summary

    def __post_init__(self):
        import openai

        try:
            self._client = openai.AsyncOpenAI(base_url=self.base_url or None, api_key=self.api_key,
                                              timeout=self.timeout, max_retries=0)
        except openai.OpenAIError:
            raise FatalAPIError("no API key: set OPENAI_API_KEY (any value for a local server that ignores it)") from None

    async def chat(self, messages: list[dict], **parameters):
        """One chat completion; retried as the module says. Returns the openai response object."""
        import openai

        for attempt in range(self.max_retries + 1):
            try:
                return await self._client.chat.completions.create(model=self.model, messages=messages, **parameters)
            except openai.AuthenticationError:
                raise FatalAPIError("the API key was refused (401): check OPENAI_API_KEY") from None
            except openai.PermissionDeniedError:
                raise FatalAPIError(f"permission denied (403) for model {self.model!r}") from None
            except openai.NotFoundError:
                raise FatalAPIError(f"model {self.model!r} not found at {self.base_url or 'api.openai.com'} (404)") from None
            except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                    openai.APIConnectionError) as error:
                reason = type(error).__name__
                self.retries[reason] = self.retries.get(reason, 0) + 1
                if attempt == self.max_retries:
                    raise
                await asyncio.sleep(self._wait(attempt, error))
            except openai.APIStatusError as error:
                if error.status_code >= 500 or error.status_code == 429:
                    self.retries[str(error.status_code)] = self.retries.get(str(error.status_code), 0) + 1
                    if attempt == self.max_retries:
                        raise
                    await asyncio.sleep(self._wait(attempt, error))
                else:
                    raise FatalAPIError(f"the API refused the request ({error.status_code}): "
                                        f"{str(error.message)[:200]}") from None

    def _wait(self, attempt: int, error) -> float:
        response = getattr(error, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        try:
            if retry_after is not None:
                return min(float(retry_after), self.max_backoff_seconds)
        except ValueError:
            pass
        return min(self.backoff_seconds * 2 ** attempt, self.max_backoff_seconds) * (0.5 + random.random() / 2)

    async def close(self):
        await self._client.close()
