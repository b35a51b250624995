"""Server: the OpenAI API shape over a Generator, plus a small web page, on the standard library's HTTP server.

    POST /v1/chat/completions   the last user message is the instruction ("input" is an optional extra field)
    POST /v1/completions        the prompt text as it is, no template
    GET  /v1/models             the one model served
    GET  /                      a page with instruction, input, sampling controls and a streamed answer

Requests are handled on threads but generate one at a time (Generator.lock), so concurrent answers queue
and never interleave. Every bad request gets a 4xx with an OpenAI-style error body and the server goes on.
"""

import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .generate import Generator, Sampling

PAGE = Path(__file__).resolve().parent / "page.html"
MAX_BODY_BYTES = 1 << 20


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def make_server(generator: Generator, host: str, port: int, api_key: str = "", max_tokens_cap: int = 1024,
                default_sampling: Sampling | None = None) -> ThreadingHTTPServer:
    """A server bound to host:port (not yet serving: call serve_forever)."""
    defaults = default_sampling or Sampling()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # quiet: requests are not printed (they may carry secrets)
            pass

        def do_GET(self):
            try:
                if self.path in ("/", "/index.html"):
                    return self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
                self._authorize()
                if self.path == "/v1/models":
                    return self._json(200, {"object": "list", "data": [
                        {"id": generator.name, "object": "model", "created": 0, "owned_by": "alpaca-lora"}]})
                raise RequestError(404, f"no such endpoint: GET {self.path}", kind="not_found_error")
            except RequestError as error:
                self._error(error)

        def do_POST(self):
            try:
                self._authorize()
                if self.path not in ("/v1/chat/completions", "/v1/completions"):
                    raise RequestError(404, f"no such endpoint: POST {self.path}", kind="not_found_error")
                chat = self.path == "/v1/chat/completions"
                body = self._body()
                prompt = _chat_prompt(generator, body) if chat else _completion_prompt(body)
                sampling, seed = _sampling(body, defaults, max_tokens_cap)
                prompt_tokens = len(generator.prompt_ids(prompt))
                if prompt_tokens + sampling.max_new_tokens > generator.context_length:
                    raise RequestError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens "
                                            f"({sampling.max_new_tokens}) exceeds the model's context of "
                                            f"{generator.context_length} tokens", "messages" if chat else "prompt")
                stream = body.get("stream", False)
                if not isinstance(stream, bool):
                    raise RequestError(400, "'stream' must be true or false", "stream")
                if stream:
                    if sampling.num_beams > 1:
                        raise RequestError(400, "num_beams > 1 cannot stream: beam search settles the text only at "
                                                "the end; send stream: false", "num_beams")
                    return self._stream(prompt, sampling, seed, chat)
                answer = generator.answer([prompt], sampling, seed)[0]
                return self._json(200, _completion(generator.name, answer, chat))
            except RequestError as error:
                self._error(error)
            except ValueError as error:  # a sampling combination the generator refuses
                self._error(RequestError(400, str(error)))

        # ---- helpers ----
        def _authorize(self):
            if not api_key:
                return
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                   kind="authentication_error")

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                raise RequestError(413, f"request body over {MAX_BODY_BYTES} bytes")
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise RequestError(400, f"malformed JSON body: {error}") from None
            if not isinstance(body, dict):
                raise RequestError(400, "the body must be a JSON object")
            return body

        def _stream(self, prompt, sampling, seed, chat):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            completion_id, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
            stop = threading.Event()

            def event(delta: str | None, finish_reason=None, role=False):
                if chat:
                    payload = {"index": 0, "delta": ({"role": "assistant", "content": ""} if role else
                                                     {"content": delta} if delta is not None else {}),
                               "finish_reason": finish_reason}
                    obj = "chat.completion.chunk"
                else:
                    payload = {"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}
                    obj = "text_completion"
                chunk = {"id": completion_id, "object": obj, "created": created, "model": generator.name,
                         "choices": [payload]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            try:
                if chat:
                    event(None, role=True)
                started = False
                for piece in generator.stream(prompt, sampling, seed, stop):
                    if isinstance(piece, str):
                        # the first piece may carry the space that separates the answer from the prompt
                        event(piece.lstrip() if not started else piece)
                        started = True
                    else:
                        event(None, finish_reason=piece.finish_reason)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the client left: stop generating for it
                stop.set()

        def _json(self, status: int, obj: dict):
            self._send(status, json.dumps(obj).encode(), "application/json")

        def _send(self, status: int, data: bytes, content_type: str):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, error: RequestError):
            self._json(error.status, {"error": {"message": error.message, "type": error.kind, "param": error.param,
                                                "code": None}})

    return ThreadingHTTPServer((host, port), Handler)


def _chat_prompt(generator: Generator, body: dict) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or \
                message.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise RequestError(400, "each message needs a role (system, user, assistant) and string content", "messages")
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users or not users[-1].strip():
        raise RequestError(400, "no user message with an instruction", "messages")
    extra_input = body.get("input", "")
    if not isinstance(extra_input, str):
        raise RequestError(400, "'input' must be a string", "input")
    # Alpaca is single-turn: the last user message is the instruction
    return generator.build_prompt(users[-1], extra_input)


def _completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(400, "'prompt' must be a non-empty string", "prompt")
    return prompt


def _sampling(body: dict, defaults: Sampling, max_tokens_cap: int) -> tuple[Sampling, int | None]:
    n = body.get("n", 1)
    if n != 1:
        raise RequestError(400, "only n=1 is supported", "n")
    values = {"temperature": body.get("temperature", defaults.temperature), "top_p": body.get("top_p", defaults.top_p),
              "top_k": body.get("top_k", defaults.top_k), "num_beams": body.get("num_beams", defaults.num_beams),
              "max_new_tokens": body.get("max_completion_tokens", body.get("max_tokens", defaults.max_new_tokens)),
              "repetition_penalty": body.get("repetition_penalty", defaults.repetition_penalty)}
    names = {"max_new_tokens": "max_tokens"}
    try:
        sampling = Sampling(**values).validated(max_tokens_cap, prefix="")
    except ValueError as error:
        message = str(error)
        for ours, theirs in names.items():
            message = message.replace(ours, theirs)
        param = message.split(" ", 1)[0]
        raise RequestError(400, message, param) from None
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, "'seed' must be an integer", "seed")
    return sampling, seed


def _completion(model_name: str, answer, chat: bool) -> dict:
    usage = {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
             "total_tokens": answer.prompt_tokens + answer.completion_tokens}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": answer.text},
                  "finish_reason": answer.finish_reason}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": answer.text, "finish_reason": answer.finish_reason, "logprobs": None}
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name, "choices": [choice], "usage": usage}
