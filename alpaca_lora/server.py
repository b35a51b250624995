"""Server: the OpenAI API shape over a Generator, plus a small web page, on uvicorn (ASGI) with Starlette.

    POST /v1/chat/completions   the last user message is the instruction ("input" is an optional extra field)
    POST /v1/completions        the prompt text as it is, no template
    GET  /v1/models             the models served: one, or several adapters of one base and the base
    GET  /                      a page with instruction, input, sampling controls and a streamed answer

HTTP itself (framing, chunked bodies, keep-alive, a body never read) is uvicorn's and h11's; requests are checked
against pydantic models (openai_schema.py). Every bad request gets a 4xx with an OpenAI-style error body and the server goes on.
Concurrent requests are generated together (batcher.py: continuous batching, up to max_batch at once); what the batch
cannot take (beam search, a repetition penalty, a seeded sample) is answered one at a time (Generator.lock). Past
max_batch + max_queue requests in hand, a request gets 429 with Retry-After; a request whose client has left stops
generating. On a loopback address only loopback Host names are
served, and only JSON bodies are taken, so a web page elsewhere cannot drive a server that has no key.
"""

import asyncio
import hmac
import json
import socket
import threading
import time
import uuid
from pathlib import Path

from .batcher import Batcher
from .generate import Answer, Generator, Sampling
from .openai_schema import (RequestError, chat_logprobs, chat_prompt, completion_body, completion_logprobs,
                            completion_prompts, logprobs_asked, parse_request, read_json_body, sampling_of, scores_only,
                            usage_of)

PAGE = Path(__file__).resolve().parent / "page.html"
HEADER_SECONDS = 10  # the most a new connection may take to send its first request's headers
MAX_CONNECTIONS = 128
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
def make_app(generator: Generator, api_key: str = "", max_tokens_cap: int = 1024,
             default_sampling: Sampling | None = None, loopback_only: bool = True, batcher: Batcher | None = None,
             max_queue: int = 16):
    """The ASGI application; without a batcher every request is answered one at a time."""
    from starlette.applications import Starlette
    from starlette.concurrency import iterate_in_threadpool
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    defaults = default_sampling or Sampling()
    page = PAGE.read_text().replace("__DEFAULTS__", json.dumps({
        "temperature": defaults.temperature, "top_p": defaults.top_p, "top_k": defaults.top_k,
        "num_beams": defaults.num_beams, "max_tokens": defaults.max_new_tokens})).replace(
        "__CHAT__", json.dumps(generator.chat_template is not None)).replace("__MODELS__", json.dumps(list(generator.served)))
    busy = {"requests": 0}  # being answered or waiting
    capacity = (batcher.max_batch if batcher else 1) + max_queue

    def error_response(error: RequestError) -> Response:
        return JSONResponse({"error": {"message": error.message, "type": error.kind, "param": error.param,
                                       "code": None}}, status_code=error.status,
                            headers={"Retry-After": "5"} if error.status == 429 else None)

    async def index(request):
        return HTMLResponse(page)

    async def models(request):
        _authorize(request, api_key)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "alpaca-lora"} for name in generator.served]})

    async def completions(request):
        _authorize(request, api_key)
        chat = request.url.path == "/v1/chat/completions"
        parsed = parse_request(await read_json_body(request), chat)
        model = _served_model(generator, parsed.model)
        # (token ids, the text an echo repeats) of each prompt: a chat has one, a completion request one or more
        prompts = [(chat_prompt(generator, parsed), "")] if chat else completion_prompts(generator, parsed)
        with_logprobs, top = logprobs_asked(parsed)
        if scores_only(parsed):  # the prompts' log-probabilities, nothing generated
            answers = [Answer("", len(ids), 0, "length") for ids, _ in prompts]
            return JSONResponse(completion_body(model, answers, chat, [
                await _logprobs(generator, model, ids, answer, chat, top, echo=True)
                for (ids, _), answer in zip(prompts, answers)], echoes=[text for _, text in prompts]))
        sampling, stop = sampling_of(parsed, defaults, max_tokens_cap)
        for ids, _ in prompts:
            if len(ids) + sampling.max_new_tokens > generator.context_length:
                raise RequestError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({sampling.max_new_tokens}) "
                                        f"exceeds the model's context of {generator.context_length} tokens",
                                   "messages" if chat else "prompt")
        if parsed.stream and sampling.num_beams > 1:
            raise RequestError(400, "num_beams > 1 cannot stream: beam search settles the text only at the end; "
                                    "send stream: false", "num_beams")
        if parsed.stream and len(prompts) > 1:
            raise RequestError(400, "several prompts are answered with whole answers only: send stream: false",
                               "prompt")
        if busy["requests"] >= capacity:
            raise RequestError(429, f"the server is busy ({busy['requests']} requests in hand, {max_queue} of them "
                                    "may wait); retry later", kind="rate_limit_error")
        stop_event = threading.Event()
        batched = batcher is not None and batcher.takes(sampling, parsed.seed)
        if parsed.stream:  # counted while its events are produced (a client gone before the first one costs nothing)
            [(prompt, _)] = prompts
            pieces = (batcher.stream(prompt, sampling, stop, model) if batched else
                      iterate_in_threadpool(generator.stream(prompt, sampling, parsed.seed, stop_event, stop, model)))
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            return StreamingResponse(_events(pieces, stop_event, busy, model, chat, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        each = [(ids, text) for ids, text in prompts for _ in range(parsed.n)]  # n answers to each prompt, in order
        busy["requests"] += 1
        try:
            if batched:  # every answer joins the batch
                answers = await _last_unless_abandoned(request, [batcher.stream(ids, sampling, stop, model)
                                                                 for ids, _ in each])
            else:  # rows of one generate() call
                answers = await _answer_unless_abandoned(request, generator, model, [ids for ids, _ in each],
                                                         sampling, parsed.seed, stop_event, stop)
        finally:
            busy["requests"] -= 1
        echo = not chat and parsed.echo
        logprobs = [await _logprobs(generator, model, ids, answer, chat, top, echo)
                    for (ids, _), answer in zip(each, answers)] if with_logprobs else None
        return JSONResponse(completion_body(model, answers, chat, logprobs, parsed.n,
                                            echoes=[text for _, text in each] if echo else None))

    def handled(endpoint):
        async def run(request):
            try:
                return await endpoint(request)
            except RequestError as error:
                return error_response(error)
            except ValueError as error:  # a sampling combination the generator refuses
                return error_response(RequestError(400, str(error)))
        return run

    async def not_found(request, exc):
        return error_response(RequestError(exc.status_code, f"no such endpoint: {request.method} {request.url.path}",
                                           kind="not_found_error" if exc.status_code == 404 else "invalid_request_error"))

    app = Starlette(routes=[Route("/", index), Route("/index.html", index), Route("/v1/models", handled(models)),
                            Route("/v1/chat/completions", handled(completions), methods=["POST"]),
                            Route("/v1/completions", handled(completions), methods=["POST"])],
                    exception_handlers={404: not_found, 405: not_found})

    async def application(scope, receive, send):
        if scope["type"] == "http" and loopback_only and _host(scope) not in LOOPBACK_HOSTS:
            # DNS rebinding: a page on evil.example whose name now points to 127.0.0.1 sends Host: evil.example
            return await error_response(RequestError(
                400, f"Host {_host(scope)!r} is not this server's name; call it as http://127.0.0.1:<port>",
                kind="invalid_request_error"))(scope, receive, send)
        await app(scope, receive, send)
    return application


def _host(scope) -> str:
    host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
    return host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]


def _authorize(request, api_key: str) -> None:
    if not api_key:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error")


def _served_model(generator: Generator, name: str | None) -> str:
    """The name a request's answer is given: the served model it asks for (with several adapters, an unknown name is
    404 and none is the first adapter); with one adapter, that one's name whatever the request says."""
    if generator.routing is None or name is None:
        return generator.name
    if name not in generator.served:
        raise RequestError(404, f"the model {name!r} is not served here; use one of {', '.join(generator.served)} "
                                "(GET /v1/models)", "model", kind="not_found_error")
    return name


async def _answer_unless_abandoned(request, generator, model, prompts, sampling, seed, stop_event, stop) -> list:
    """Generate in a worker thread; if the client goes away meanwhile, tell generation to stop."""
    task = asyncio.ensure_future(asyncio.to_thread(
        lambda: generator.answer(prompts, sampling, seed, stop_event=stop_event, stop=stop, model_name=model)))
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            stop_event.set()
    return task.result()


async def _logprobs(generator, model: str, prompt: list[int], answer, chat: bool, top: int, echo: bool) -> dict:
    """The log-probabilities of the answer's tokens (and with `echo`, of the prompt's but the first, and of the token
    that ended the answer, as vLLM gives them: lm-evaluation-harness takes the last item for the one generated token),
    computed by one forward pass over prompt + answer (so they are the model's own, whatever sampled the answer)."""
    ids = prompt + answer.token_ids + ([answer.end_token] if echo and answer.end_token is not None else [])
    start = 1 if echo else len(prompt)
    scored = await asyncio.to_thread(generator.token_logprobs, ids, start, top, model) if len(ids) > start else []
    if chat:
        return chat_logprobs(generator.tokenizer, prompt, scored)
    if echo:  # the prompt's first token is echoed too, with no log-probability
        return completion_logprobs(generator.tokenizer, [], [(prompt[0], None, [])] + scored)
    return completion_logprobs(generator.tokenizer, prompt, scored)


async def _last_unless_abandoned(request, streams: list) -> list:
    """The last item of each batched answer's stream (its Answer); if the client goes away meanwhile, the streams are
    cancelled, which cancels their requests in the batch."""
    async def last(pieces):
        async for item in pieces:
            final = item
        return final
    task = asyncio.ensure_future(asyncio.gather(*(last(pieces) for pieces in streams)))
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await asyncio.wait({task})
            raise RequestError(499, "the client closed the request")
    return task.result()


async def _events(pieces, stop_event, busy, model_name: str, chat: bool, include_usage: bool = False):
    """Server-sent events of one streamed answer; with `include_usage`, a last chunk with no choices carries the
    token counts (as OpenAI's stream_options asks); an error becomes an error event, and [DONE] always ends it."""
    completion_id, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())

    def event(delta: str | None, finish_reason=None, role=False) -> str:
        if chat:
            payload = {"index": 0, "delta": ({"role": "assistant", "content": ""} if role else
                                             {"content": delta} if delta is not None else {}),
                       "finish_reason": finish_reason}
        else:
            payload = {"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}
        chunk = {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
                 "created": created, "model": model_name, "choices": [payload]}
        return f"data: {json.dumps(chunk)}\n\n"

    busy["requests"] += 1
    try:
        if chat:
            yield event(None, role=True)
        started = False
        async for piece in pieces:
            if isinstance(piece, str):
                # the first piece may carry the space that separates the answer from the prompt
                yield event(piece.lstrip() if not started else piece)
                started = True
            else:
                yield event(None, finish_reason=piece.finish_reason)
                if include_usage:
                    usage = {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
                             "created": created, "model": model_name, "choices": [], "usage": usage_of([piece])}
                    yield f"data: {json.dumps(usage)}\n\n"
    except Exception as error:  # after the headers went out: say so inside the stream
        yield f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
    finally:
        stop_event.set()  # the client left, or the answer is done: either way generation ends
        await pieces.aclose()  # a batched answer cancels its request now rather than when collected
        busy["requests"] -= 1
    yield "data: [DONE]\n\n"


class Server:
    """uvicorn serving the app on an address bound at once (port 0 picks a free one: see `port`)."""

    def __init__(self, generator: Generator, host: str, port: int, api_key: str = "", max_tokens_cap: int = 1024,
                 default_sampling: Sampling | None = None, max_batch: int = 8, max_queue: int = 16):
        import uvicorn

        loopback = host in LOOPBACK_HOSTS or host.startswith("127.")
        self.batcher = Batcher(generator, max_batch) if max_batch > 1 else None
        app = make_app(generator, api_key, max_tokens_cap, default_sampling, loopback_only=loopback,
                       batcher=self.batcher, max_queue=max_queue)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP said outright: asyncio turns Nagle's algorithm off only on sockets that say they are TCP, and
        # with it on, a response's headers and body (two writes) meet the client's delayed ACK: 40 ms per answer
        self.socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as error:
            self.socket.close()
            raise ValueError(f"--server_name {host} --port {port}: cannot listen there ({error.strerror}); "
                             "choose another port") from None
        self.port = self.socket.getsockname()[1]
        self.loopback = loopback
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=5,
                                limit_concurrency=MAX_CONNECTIONS, http=_with_header_deadline(),
                                timeout_graceful_shutdown=2)
        self.uvicorn = uvicorn.Server(config)
        self.thread = None

    def serve(self) -> None:
        """Serve until Ctrl-C (in the main thread) or stop()."""
        if self.batcher:
            self.batcher.start()
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            if self.batcher:
                self.batcher.close()

    def start(self) -> "Server":
        """Serve from a background thread, once it is listening."""
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()
        while not self.uvicorn.started and self.thread.is_alive():
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self.thread:
            self.thread.join(timeout=10)
        self.socket.close()


def _with_header_deadline():
    """uvicorn's h11 protocol, but a connection that has not sent a whole request's headers within
    HEADER_SECONDS is closed: uvicorn times out idle keep-alive connections only, so half-sent requests
    (a slow or hostile client) would otherwise stay open for good."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline:
        def __init__(self, *args, **kwargs):
            self._protocol = H11Protocol(*args, **kwargs)

        def connection_made(self, transport):
            self._protocol.connection_made(transport)
            self._deadline = asyncio.get_running_loop().call_later(HEADER_SECONDS, self._expire, transport)

        def _expire(self, transport):
            if self._protocol.cycle is None:  # no request has got as far as its headers
                transport.close()

        def connection_lost(self, exc):
            self._deadline.cancel()
            self._protocol.connection_lost(exc)

        def __getattr__(self, name):  # data_received, eof_received, pause_writing, ...: the protocol's own
            return getattr(self._protocol, name)

    return HeaderDeadline
