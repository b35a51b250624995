"""The OpenAI API's shapes: request bodies read and checked (pydantic models, strict types), the prompt and sampling
they ask for, and the JSON of an answer. Errors are RequestErrors, which the server turns into OpenAI-style bodies.
Unknown fields are ignored, as OpenAI's API does.
"""

import asyncio
import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from .conversations import user_message
from .generate import Generator, Sampling

MAX_BODY_BYTES = 1 << 20
BODY_SECONDS = 30  # the most a client may take to send its body
MAX_CHOICES = 8  # the most answers (n) one request may ask for
MAX_PROMPTS = 64  # the most answers (prompts times n) one completion request may ask for
Number = StrictFloat | StrictInt


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


# ---- the request bodies: unknown fields are ignored, as OpenAI's API does; types are strict (n: true is no 1) ----

class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Sampled(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    num_beams: StrictInt | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    repetition_penalty: Number | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    stop: StrictStr | list[StrictStr] | None = None


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    input: StrictStr = ""
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_Sampled):
    # a text, a list of token ids, or a list of either (several prompts)
    prompt: StrictStr | list[StrictInt] | list[StrictStr | list[StrictInt]]
    logprobs: StrictInt | None = Field(default=None, ge=0, le=5)
    echo: StrictBool = False


def logprobs_asked(request) -> tuple[bool, int]:
    """Whether the answer's log-probabilities are asked for, and how many alternatives per token."""
    if isinstance(request, ChatRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        asked, top = request.logprobs, request.top_logprobs or 0
    else:
        asked, top = request.logprobs is not None, request.logprobs or 0
    if asked and request.stream:
        raise RequestError(400, "logprobs are returned with whole answers only: send stream: false", "logprobs")
    return asked, top


def parse_request(body: dict, chat: bool) -> "ChatRequest | CompletionRequest":
    try:
        return (ChatRequest if chat else CompletionRequest).model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise RequestError(400, f"{param}: {first['msg']}" if param else first["msg"], param) from None


async def read_json_body(request) -> dict:
    """The body as a JSON object: JSON content only (a cross-site form cannot send it without asking), at most
    MAX_BODY_BYTES, within BODY_SECONDS, no text that is not Unicode."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise RequestError(415, f"Content-Type {content_type or 'none'!r}: send application/json")
    declared = request.headers.get("content-length")
    if declared is not None and int(declared) > MAX_BODY_BYTES:
        raise RequestError(413, f"request body over {MAX_BODY_BYTES} bytes")
    raw = bytearray()

    async def receive():
        async for chunk in request.stream():
            raw.extend(chunk)
            if len(raw) > MAX_BODY_BYTES:
                raise RequestError(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        await asyncio.wait_for(receive(), BODY_SECONDS)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the body took longer than {BODY_SECONDS} s to arrive") from None
    try:
        body = json.loads(bytes(raw) or b"null")
        check_unicode(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"malformed JSON body: {error}") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON body: nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    return body


def check_unicode(value) -> None:
    """JSON may escape half of a UTF-16 pair ("\\ud800"), which is no character: refuse it here, not in the tokenizer."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "a lone surrogate (\\ud800-\\udfff) is no character") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key)
            check_unicode(item)
    elif isinstance(value, list):
        for item in value:
            check_unicode(item)


def chat_prompt(generator: Generator, request: ChatRequest) -> list[int]:
    """The prompt's token ids: the whole conversation rendered with the chat template the adapter was trained with;
    for an Alpaca adapter (single-turn), the last user message as the instruction. `input` (not OpenAI's) is an
    Alpaca row's input, appended to the last user message."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in request.messages]
    if any(m["role"] == "tool" for m in messages):
        raise RequestError(400, "tool messages are not supported", "messages")
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise RequestError(400, "the last message must be a user message with an instruction", "messages")
    if generator.chat_template is None:
        return generator.instruction_ids(messages[-1]["content"], request.input)
    messages[-1]["content"] = user_message(messages[-1]["content"], request.input)
    try:
        return generator.conversation_ids(messages)
    except ValueError as error:  # the template refuses the conversation (a role it lacks, turns out of order)
        raise RequestError(400, str(error), "messages") from None


def completion_prompts(generator: Generator, request: CompletionRequest) -> list[tuple[list[int], str]]:
    """Each prompt of a completion request as (token ids, its text): a text is laid out as training lays out text
    (BOS once, generator.text_ids); token ids are used as they are (as evaluation tools send them, already laid out
    by the model's tokenizer), and their text is their decoding."""
    prompt = request.prompt
    prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
    if not prompts or len(prompts) * request.n > MAX_PROMPTS:
        raise RequestError(400, f"'prompt' must hold 1 to {MAX_PROMPTS} prompts (times n)", "prompt")
    laid_out, vocabulary = [], len(generator.tokenizer)
    for one in prompts:
        if not one:
            raise RequestError(400, "'prompt' must be a non-empty string or list of token ids", "prompt")
        if isinstance(one, str):
            laid_out.append((generator.text_ids(one), one))
            continue
        if not all(0 <= token < vocabulary for token in one):
            raise RequestError(400, f"'prompt' holds a token id outside the vocabulary (0 to {vocabulary - 1})",
                               "prompt")
        laid_out.append((list(one), generator.tokenizer.decode(one)))
    return laid_out


def scores_only(request) -> bool:
    """A completion that only scores its prompt (echo with max_tokens 0, as evaluation tools ask): nothing is
    generated."""
    return isinstance(request, CompletionRequest) and request.echo and (
        request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens) == 0


def sampling_of(request: _Sampled, defaults: Sampling, max_tokens_cap: int) -> tuple[Sampling, tuple[str, ...]]:
    if not 1 <= request.n <= MAX_CHOICES:
        raise RequestError(400, f"n must be a whole number in [1, {MAX_CHOICES}]", "n")
    if request.n > 1 and request.stream:
        raise RequestError(400, "n > 1 is answered with whole answers only: send stream: false", "n")
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if len(stop) > 4 or not all(stop):
        raise RequestError(400, "'stop' takes up to 4 non-empty strings", "stop")
    given = {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k,
             "num_beams": request.num_beams, "repetition_penalty": request.repetition_penalty,
             "max_new_tokens": request.max_completion_tokens if request.max_completion_tokens is not None
             else request.max_tokens}
    values = {name: getattr(defaults, name) if value is None else value for name, value in given.items()}
    try:
        sampling = Sampling(**values).validated(max_tokens_cap, prefix="")
    except ValueError as error:
        message = str(error).replace("max_new_tokens", "max_tokens")
        raise RequestError(400, message, message.split(" ", 1)[0]) from None
    return sampling, stop


def usage_of(answers: list, n: int = 1) -> dict:
    """Token counts of a request's answers (each prompt's n answers follow each other and share it: counted once)."""
    usage = {"prompt_tokens": sum(a.prompt_tokens for a in answers[::n]),
             "completion_tokens": sum(a.completion_tokens for a in answers)}
    return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


def chat_logprobs(tokenizer, context: list[int], scored: list) -> dict:
    """OpenAI's chat `logprobs` object for the answer's tokens (`scored`: Generator.token_logprobs' items)."""
    content, ids = [], list(context)
    for token, logprob, best in scored:
        pieces = _pieces(tokenizer, ids, [token] + [other for other, _ in best])
        content.append({**pieces[0], "logprob": logprob, "top_logprobs": [
            {**piece, "logprob": value} for piece, (_, value) in zip(pieces[1:], best)]})
        ids.append(token)
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, context: list[int], scored: list) -> dict:
    """The completions API's `logprobs` object for the tokens of `scored` after `context`; an item with no
    log-probability (None: an echoed prompt's first token) has no alternatives either."""
    tokens, token_logprobs, top_logprobs, offsets, ids, offset = [], [], [], [], list(context), 0
    for token, logprob, best in scored:
        pieces = [piece["token"] for piece in _pieces(tokenizer, ids, [token] + [other for other, _ in best])]
        offsets.append(offset)
        offset += len(pieces[0])
        tokens.append(pieces[0])
        token_logprobs.append(logprob)
        top_logprobs.append(None if logprob is None else dict(zip(pieces[1:], (value for _, value in best))))
        ids.append(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _pieces(tokenizer, before: list[int], candidates: list[int]) -> list[dict]:
    """Each candidate token as the text it adds after `before` (SentencePiece writes a word's space only when
    something precedes it, so a token alone would lose it), with its UTF-8 bytes."""
    context = before[-8:]
    prefix = len(tokenizer.decode(context, skip_special_tokens=True))
    texts = [tokenizer.decode(context + [token], skip_special_tokens=True)[prefix:] for token in candidates]
    return [{"token": text, "bytes": list(text.encode("utf-8"))} for text in texts]


def completion_body(model_name: str, answers: list, chat: bool, logprobs: list | None = None, n: int = 1,
                    echoes: list[str] | None = None) -> dict:
    """The JSON of whole answers: one choice per answer (n per prompt, prompt by prompt), each completion's text after
    its echoed prompt if asked; usage counting each prompt once."""
    logprobs = logprobs or [None] * len(answers)
    echoes = echoes or [""] * len(answers)
    usage = usage_of(answers, n)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": answer.text},
                    "finish_reason": answer.finish_reason, "logprobs": logprobs[i]} for i, answer in enumerate(answers)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "choices": choices, "usage": usage}
    choices = [{"index": i, "text": echoes[i] + answer.text, "finish_reason": answer.finish_reason, "logprobs": logprobs[i]}
               for i, answer in enumerate(answers)]
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices, "usage": usage}
