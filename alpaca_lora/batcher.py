"""Batcher: the server's concurrent requests generated together, through transformers' continuous batching.

A request joins the running batch at the next decoding step and leaves it when done (transformers'
ContinuousBatchingManager: a paged KV cache, one background thread stepping every request it holds), so eight
clients share the hardware instead of queueing for it: on this project's CPU, 8 concurrent clients get several times
one client's tokens per second (bench/generate_throughput.py). Each request keeps its own temperature, top_p and
top_k; a greedy one is top_k=1, the argmax, so its answer is the one it gets alone whatever else is in the batch (the
tests compare them). A client that leaves or whose text reaches a stop string is cancelled, which frees its slot at
the next step.

What the manager cannot do is answered one request at a time by Generator.stream, as before: beam search, a
repetition penalty (the manager's sampling knows temperature, top_p and top_k only), and a seeded sample (its random
generator is shared by the whole batch, so a seed could not make one request's answer reproducible).
"""

import asyncio
import uuid

import torch

from .generate import Answer, Generator, Sampling, StopStrings, tokens_covering
from .mixed_adapters import BASE

PAGE_TOKENS = 64  # tokens per page of the paged KV cache


class Batcher:
    def __init__(self, generator: Generator, max_batch: int):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.generator, self.max_batch = generator, max_batch
        model = generator.model
        # with an adapter, the LoRA layers live inside the transformers model that peft wraps: batching that model
        # generates with base + adapter
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.vocab_size = inner.config.vocab_size
        # every sampling step (temperature, top_k, top_p) must be present for requests to set their own values
        config = GenerationConfig(do_sample=True, temperature=0.7, top_k=40, top_p=0.9,
                                  eos_token_id=generator.stop_ids, pad_token_id=generator.tokenizer.pad_token_id)
        # on a CPU the manager would size its cache from the machine's free memory; room for max_batch requests of
        # the model's whole context is what can be used. On a GPU it sizes the cache from free GPU memory.
        pages = -(-max_batch * generator.context_length // PAGE_TOKENS) if generator.device.type == "cpu" else None
        # several adapters: the step's requests are read when its forward pass starts (so the batch is prepared
        # step by step, not ahead, and not replayed from a CUDA graph), and two requests with one prompt must not
        # share its cached keys and values, which each adapter computes differently
        mixed = {"use_async_batching": False, "use_cuda_graph": False, "allow_block_sharing": False} \
            if generator.routing else {}
        self.manager = inner.init_continuous_batching(
            generation_config=config, continuous_batching_config=ContinuousBatchingConfig(
                page_size=PAGE_TOKENS, num_blocks=pages, max_requests_per_batch=max_batch, per_request_processors=True,
                **mixed))
        self.adapter_of_request = {}  # request id -> the peft adapter it is answered through
        # (one batcher per generator: the hooks read this batcher's batch, until close() removes them)
        self.hooks = [inner.register_forward_pre_hook(self._route_tokens, with_kwargs=True),
                      inner.register_forward_hook(lambda *_: generator.routing.route(None))] if generator.routing else []

    def takes(self, sampling: Sampling, seed: int | None) -> bool:
        """Whether this request can join the batch (see the module's docstring for what cannot)."""
        return sampling.num_beams == 1 and sampling.repetition_penalty == 1 and (seed is None or
                                                                                  sampling.temperature == 0)

    def _sampling_kwargs(self, sampling: Sampling) -> dict:
        if sampling.temperature == 0:  # greedy: only the likeliest token survives top_k
            return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        return {"temperature": float(sampling.temperature), "top_k": sampling.top_k or self.vocab_size,
                "top_p": float(sampling.top_p)}

    def _route_tokens(self, module, args, kwargs):
        """Before a batch's forward pass (in the manager's thread): each token through its request's adapter."""
        if "cu_seq_lens_q" not in kwargs:  # not the batch's forward pass
            return
        # the requests of the step being computed, in the order their tokens are laid out
        requests = self.manager.batch_processor.inputs_and_outputs.requests_in_batch
        names = [name for future in requests
                 for name in [self.adapter_of_request.get(future.state.request_id, BASE)] * future.query_length]
        if len(names) != int(kwargs["cu_seq_lens_q"][len(requests)]):
            raise RuntimeError(f"adapter routing: the batch's {len(requests)} requests hold {len(names)} tokens, its "
                               f"forward pass {int(kwargs['cu_seq_lens_q'][len(requests)])}")
        # padding the batch may add runs through the bare base
        self.generator.routing.route(names + [BASE] * (kwargs["input_ids"].shape[1] - len(names)))

    async def stream(self, prompt: list[int], sampling: Sampling, stop: tuple[str, ...] = (),
                     model_name: str | None = None):
        """Yield the answer's text as the batch generates it (held back where it could start a stop string); the
        last item is the finished Answer. Closing the iterator early (a client gone) cancels the request. With
        several adapters, `model_name` picks the one it is answered through."""
        tokenizer, stop_ids = self.generator.tokenizer, self.generator.stop_ids
        outputs = asyncio.Queue()
        request_id = f"request-{uuid.uuid4().hex}"
        self.adapter_of_request[request_id] = self.generator.adapter_of(model_name)
        self.manager.register_result_handler(request_id, outputs.put_nowait)  # before it can produce anything
        self.manager.add_request(prompt, request_id=request_id, max_new_tokens=sampling.max_new_tokens,
                                 streaming=True, **self._sampling_kwargs(sampling))
        shown, decoded = StopStrings(stop), ""
        done = False  # the manager ended the request itself (an end-of-turn token, or max_new_tokens)
        try:
            while True:
                output = await self._next(outputs)
                if output.error:
                    raise RuntimeError(f"generation failed: {output.error}")
                tokens = output.generated_tokens
                ends = [i for i, token in enumerate(tokens) if token in stop_ids]
                answer_tokens = tokens[:ends[0]] if ends else tokens
                done = bool(ends) or output.is_finished() or len(tokens) >= sampling.max_new_tokens
                # decoded as a whole, so that characters split across tokens come out whole; a trailing partial
                # character (U+FFFD) waits for its next token
                text = tokenizer.decode(answer_tokens, skip_special_tokens=True)
                if not done and text.endswith("\ufffd"):
                    continue
                if new := shown.add(text[len(decoded):]):
                    yield new
                decoded = text
                if done or shown.found:
                    break
            if rest := shown.rest():
                yield rest
            # the text is what was shown: up to a stop string, if one came
            yield Answer(text=shown.text[:shown.sent].strip(), prompt_tokens=len(prompt),
                         completion_tokens=len(answer_tokens), finish_reason="stop" if ends or shown.found else "length",
                         token_ids=(tokens_covering(tokenizer, answer_tokens, shown.sent) if shown.found
                                    else answer_tokens),
                         end_token=tokens[ends[0]] if ends and not shown.found else None)
        finally:
            self.adapter_of_request.pop(request_id, None)
            if not done:  # a client gone, or a stop string: free the slot at the next step
                self.manager.cancel_request(request_id)
                # transformers drops a handler when its request finishes, which a cancelled one may never do
                with self.manager.output_router._lock:
                    self.manager.output_router.result_handlers.pop(request_id, None)

    async def _next(self, outputs: asyncio.Queue):
        """The request's next output; an error, not a wait for ever, if the manager's thread has stopped."""
        while True:
            try:
                return await asyncio.wait_for(outputs.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if not self.manager.is_running():
                    raise RuntimeError("the batch's generation thread has stopped; restart the server") from None

    def start(self) -> None:
        """Start the manager's thread (not a daemon: close() must end it)."""
        with torch.inference_mode():  # the thread takes the caller's mode: no autograd bookkeeping
            self.manager.start()

    def close(self) -> None:
        self.manager.stop(block=True, timeout=10)
        for hook in self.hooks:
            hook.remove()
