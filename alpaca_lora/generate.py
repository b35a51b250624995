"""Generate: answer instructions and conversations with a base model + LoRA adapter, one prompt at a time or in batches.

Prompts are built with the same template and the same token layout as training: with a chat template, the
conversation's text up to where the answer starts (chat_template.prompt_text) and BOS exactly once; with an
Alpaca template, [BOS] + the prompt's tokens. The model sees at inference exactly what it was trained on, and
stops at the template's end-of-turn token as well as at EOS. The adapter folder describes itself
(training_summary.json names the base model and the template), so `lora_weights` alone is enough.
"""

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter_folder import describe_adapter
from .chat_template import ChatTemplate, bos_ids, end_of_turn_ids, load_chat_template, prompt_text
from .conversations import user_message
from .errors import first_line
from .mixed_adapters import BASE, AdapterRouting, check_servable_together, parse_adapters
from .model import fast_bf16_available, load_model, load_tokenizer, set_pad_token
from .templates import load_template


@dataclass
class Sampling:
    """What the sampling flags mean: temperature 0 is greedy, > 0 samples; num_beams > 1 is beam search."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    num_beams: int = 1
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0

    def validated(self, max_new_tokens_cap: int, prefix: str = "--") -> "Sampling":
        def bad(name, rule):
            return ValueError(f"{prefix}{name} {getattr(self, name)!r}: must be {rule}")
        numbers = {"temperature": (0, 100), "top_p": (0, 1), "repetition_penalty": (0, 100)}
        for name, (low, high) in numbers.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise bad(name, f"a number in [{low}, {high}]")
        if self.top_p == 0 or self.repetition_penalty == 0:
            raise bad("top_p" if self.top_p == 0 else "repetition_penalty", "greater than 0")
        for name, low, high in (("top_k", 0, 100_000), ("num_beams", 1, 64), ("max_new_tokens", 1, max_new_tokens_cap)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise bad(name, f"a whole number in [{low}, {high}]")
        return self

    def generate_kwargs(self) -> dict:
        # floats for transformers, which refuses temperature=2 (an int, as OpenAI's API allows) outright
        kwargs = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                  "repetition_penalty": float(self.repetition_penalty), "do_sample": self.temperature > 0}
        if self.temperature > 0:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p), top_k=self.top_k)
        else:  # greedy: say so, or generation_config.json's sampling defaults would apply
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens reached)
    token_ids: list[int] = field(default_factory=list)  # the tokens of `text` (through the one a stop string cut)
    end_token: int | None = None  # the end-of-turn or EOS token that ended it (not in text or token_ids)


class Generator:
    """A loaded model, its tokenizer and template; answers lists of prompts (token ids)."""

    def __init__(self, base_model: str = "", lora_weights: str = "", prompt_template: str = "",
                 load_8bit: bool = False, load_4bit: bool = False, bf16: bool | None = None, device: str = "",
                 chat_template: str = ""):
        folders = parse_adapters(lora_weights)
        adapters = {name: describe_adapter(folder) for name, folder in folders.items()}
        if len(adapters) > 1:
            check_servable_together(adapters)
        adapter = next(iter(adapters.values()), None)  # the first: the others have its base and prompt layout
        base_model = adapter.base_model_or(base_model) if adapter else base_model
        if not base_model:
            raise ValueError("--base_model is required (or an adapter folder that names its base model)")
        self.device = torch.device(device) if device else _default_device()
        use_bf16 = fast_bf16_available(self.device) if bf16 is None else bf16
        self.template = load_template(prompt_template or (adapter and adapter.prompt_template) or "alpaca")
        # the adapter folder carries the tokenizer it was trained with (pad token and chat template included)
        self.tokenizer = load_tokenizer(adapter.folder if adapter and (adapter.folder / "tokenizer_config.json").exists()
                                        else base_model)
        # --chat_template, else the one the adapter was trained with, else none: Alpaca prompts (self.template)
        self.chat_template = (load_chat_template(chat_template, self.tokenizer) if chat_template
                              else ChatTemplate(**adapter.chat_template) if adapter and adapter.chat_template else None)
        self.stop_ids = ([self.tokenizer.eos_token_id] if self.chat_template is None
                         else end_of_turn_ids(self.chat_template, self.tokenizer))
        set_pad_token(self.tokenizer, self.stop_ids, base_model)
        quantization = "4bit" if load_4bit else "8bit" if load_8bit else None
        model = load_model(base_model, quantization, use_bf16, self.device)
        model.config.use_cache = True  # load_model sets it off for training; generation needs the KV cache
        # with name=folder pairs, every adapter and the bare base are served, each request through the one it names
        named = "=" in lora_weights
        for index, (name, folder) in enumerate(folders.items()):
            model = _with_adapter(model, folder, base_model, name if named else "default", first=index == 0)
        self.model = model.eval()
        self.name = next(iter(folders)) if folders else Path(base_model).name
        self.routing = AdapterRouting(model) if named else None
        # a request's model name -> the peft adapter it is answered through (None: the one loaded, whatever the name)
        self.served = {**{name: name for name in folders}, Path(base_model).name: BASE} if named else {self.name: None}
        if named and len(self.served) <= len(folders):
            raise ValueError(f"--lora_weights {lora_weights!r}: an adapter is named {Path(base_model).name!r}, the "
                             "base model's name, which requests use for the bare base; rename the adapter")
        self.context_length = getattr(model.config, "max_position_embeddings", 2048)
        self.lock = threading.Lock()  # one generation at a time: concurrent callers queue, never interleave

    def adapter_of(self, model_name: str | None) -> str | None:
        """The peft adapter a request for `model_name` (one of `served`; None: the first) is answered through; None
        when one adapter was loaded without a name, which answers whatever name a request gives."""
        if self.routing is None:
            return None
        if (model_name or self.name) not in self.served:
            raise ValueError(f"model {model_name!r}: not served here; use one of {', '.join(self.served)}")
        return self.served[model_name or self.name]

    def through(self, model_name: str | None):
        """The context in which this thread's forward passes use the adapter `model_name` names."""
        return self.routing.through(self.adapter_of(model_name)) if self.routing else contextlib.nullcontext()

    def text_ids(self, text: str) -> list[int]:
        """A raw prompt as training lays out text: BOS exactly once, then the text's tokens, nothing appended."""
        return bos_ids(self.tokenizer, text) + self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def instruction_ids(self, instruction: str, input: str = "") -> list[int]:
        """An instruction (and its optional input): a one-turn conversation under a chat template, else the Alpaca
        template's prompt."""
        if self.chat_template:
            return self.conversation_ids([{"role": "user", "content": user_message(instruction, input)}])
        return self.text_ids(self.template.prompt(instruction, input))

    def conversation_ids(self, messages: list[dict]) -> list[int]:
        """The prompt for the answer to `messages` (ending with a user message), rendered as training rendered it.
        Without a chat template (an Alpaca adapter), the last user message is the instruction."""
        if self.chat_template is None:
            return self.instruction_ids([m["content"] for m in messages if m["role"] == "user"][-1])
        return self.text_ids(prompt_text(self.chat_template, self.tokenizer, messages))

    def answer(self, prompts: list[list[int]], sampling: Sampling, seed: int | None = None, streamer=None,
               stop_event: threading.Event | None = None, stop: tuple[str, ...] = (),
               model_name: str | None = None) -> list[Answer]:
        """Answer a batch of prompts (token ids): left-padded with an attention mask, so each answer equals the
        prompt answered alone. Generation ends at EOS or the end-of-turn token, at max_new_tokens, when
        `stop_event` is set (the caller left), or once the text holds one of the `stop` strings, which is cut off
        with what follows it (as OpenAI's API does)."""
        ids = prompts
        width = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=self.device)
        from transformers import StoppingCriteriaList

        criteria = _StopCriteria(stop_event, stop, self.tokenizer, width)
        with self.lock, torch.no_grad(), self.through(model_name):
            if seed is not None:
                torch.manual_seed(seed)
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer,
                                         stopping_criteria=StoppingCriteriaList([criteria]), pad_token_id=pad,
                                         eos_token_id=self.stop_ids, **sampling.generate_kwargs())
        answers = []
        for row, prompt_ids in enumerate(ids):
            new = output[row, width:].tolist()
            ends = [i for i, token in enumerate(new) if token in self.stop_ids]
            stopped = bool(ends)
            end_token = new[ends[0]] if stopped else None
            if stopped:
                new = new[:ends[0]]
            while new and new[-1] == pad:
                new.pop()
            # only the new tokens are decoded, so the answer needs no cutting at the response marker
            text, cut = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), stop)
            answers.append(Answer(text=text.strip(), prompt_tokens=len(prompt_ids), completion_tokens=len(new),
                                  finish_reason="stop" if stopped or cut else "length",
                                  token_ids=tokens_covering(self.tokenizer, new, len(text)) if cut else new,
                                  end_token=None if cut else end_token))
        return answers

    def token_logprobs(self, ids: list[int], start: int, top: int = 0,
                       model_name: str | None = None) -> list[tuple[int, float, list]]:
        """For each token of `ids` from position `start` (>= 1) on: its id, its log-probability given the tokens
        before it, and the `top` likeliest tokens there as (id, log-probability). One forward pass, fp32 softmax."""
        with torch.no_grad(), self.through(model_name):
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, start - 1:len(ids) - 1]
        log_probs = logits.float().log_softmax(-1)
        chosen = log_probs.gather(-1, torch.tensor(ids[start:], device=self.device).unsqueeze(-1))[:, 0].tolist()
        best = log_probs.topk(top, dim=-1) if top else None
        return [(token, logprob, list(zip(best.indices[i].tolist(), best.values[i].tolist())) if best else [])
                for i, (token, logprob) in enumerate(zip(ids[start:], chosen))]

    def stream(self, prompt: list[int], sampling: Sampling, seed: int | None = None,
               stop_event: threading.Event | None = None, stop: tuple[str, ...] = (), model_name: str | None = None):
        """Yield the answer's text as it is generated; the last item is the finished Answer. Text that could be
        the start of a `stop` string is held back until it is known not to be one."""
        from transformers import TextIteratorStreamer

        if sampling.num_beams > 1:
            raise ValueError("num_beams > 1 cannot stream: beam search settles the text only at the end")
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop_event = stop_event or threading.Event()
        result = {}

        def run():
            try:
                result["answer"] = self.answer([prompt], sampling, seed, streamer, stop_event, stop, model_name)[0]
            except Exception as error:  # surfaced to the caller below
                result["error"] = error
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        shown = StopStrings(stop)
        for piece in streamer:
            if shown.found:
                continue  # generation is ending; the rest is not wanted
            if new := shown.add(piece):
                yield new
            if shown.found:
                stop_event.set()
        thread.join()
        if "error" in result:
            raise result["error"]
        if rest := shown.rest():
            yield rest
        yield result["answer"]


class StopStrings:
    """A streamed answer's text, let out as it comes except what could be the start of a `stop` string, which is
    held back until it is known not to be one; at a stop string the text ends (it and what follows are cut)."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop, self.text, self.sent, self.found = stop, "", 0, False
        self.held_back = max((len(s) for s in stop), default=1) - 1  # the longest stop string but its last character

    def add(self, piece: str) -> str:
        """The text that can be shown now that `piece` came."""
        self.text += piece
        shown, self.found = cut_at_stop(self.text, self.stop)
        safe = len(shown) if self.found else max(self.sent, len(self.text) - self.held_back)
        new, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return new

    def rest(self) -> str:
        """At the end of the answer: what was held back, unless a stop string came."""
        if self.found:
            return ""
        rest, self.sent = self.text[self.sent:], len(self.text)
        return rest


def tokens_covering(tokenizer, tokens: list[int], length: int) -> list[int]:
    """The fewest of `tokens` whose text reaches `length` characters: an answer cut at a stop string keeps the token
    the cut falls in (the answer's text is never cut mid-token in its tokens)."""
    for end in range(len(tokens) + 1):
        if len(tokenizer.decode(tokens[:end], skip_special_tokens=True)) >= length:
            return tokens[:end]
    return tokens


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the first of the `stop` strings, and whether one was found."""
    found = [text.index(s) for s in stop if s and s in text]
    return (text[:min(found)], True) if found else (text, False)


class _StopCriteria:
    """transformers' stopping-criteria interface: per row, whether to end generation."""

    def __init__(self, stop_event, stop: tuple[str, ...], tokenizer, prompt_width: int):
        self.stop_event, self.stop, self.tokenizer, self.prompt_width = stop_event, stop, tokenizer, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        rows = input_ids.shape[0]
        if self.stop_event is not None and self.stop_event.is_set():
            return torch.ones(rows, dtype=torch.bool, device=input_ids.device)
        if not self.stop:
            return torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        return torch.tensor([cut_at_stop(t, self.stop)[1] for t in texts], device=input_ids.device)


def _with_adapter(model, folder: str, base_model: str, name: str, first: bool):
    """The model with the adapter in `folder` added under `name` (peft wraps the base for the first one)."""
    from peft import PeftModel

    try:
        if first:
            return PeftModel.from_pretrained(model, folder, adapter_name=name)
        model.load_adapter(folder, adapter_name=name)
        return model
    except (RuntimeError, ValueError, KeyError) as error:
        raise ValueError(f"--lora_weights {folder}: does not fit --base_model {base_model} "
                         f"({first_line(error)}); pass the base model the adapter was trained on") from None


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
