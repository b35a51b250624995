"""Generate: answer instructions with a base model + LoRA adapter, one prompt at a time or in batches.

Prompts are built with the same template and the same token layout as training ([BOS] + prompt tokens),
so the model sees at inference exactly what it was trained on. The adapter folder describes itself
(training_summary.json names the base model and the template), so `lora_weights` alone is enough.
"""

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter_folder import describe_adapter
from .errors import first_line
from .model import fast_bf16_available, load_model, load_tokenizer
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


class Generator:
    """A loaded model, its tokenizer and template; answers lists of prompts."""

    def __init__(self, base_model: str = "", lora_weights: str = "", prompt_template: str = "",
                 load_8bit: bool = False, load_4bit: bool = False, bf16: bool | None = None, device: str = ""):
        adapter = describe_adapter(lora_weights) if lora_weights else None
        base_model = adapter.base_model_or(base_model) if adapter else base_model
        if not base_model:
            raise ValueError("--base_model is required (or an adapter folder that names its base model)")
        self.device = torch.device(device) if device else _default_device()
        use_bf16 = fast_bf16_available(self.device) if bf16 is None else bf16
        self.template = load_template(prompt_template or (adapter and adapter.prompt_template) or "alpaca")
        # the adapter folder carries the tokenizer it was trained with (pad token included)
        self.tokenizer = load_tokenizer(lora_weights if lora_weights and (Path(lora_weights) / "tokenizer_config.json").exists()
                                        else base_model)
        quantization = "4bit" if load_4bit else "8bit" if load_8bit else None
        model = load_model(base_model, quantization, use_bf16, self.device)
        model.config.use_cache = True  # load_model sets it off for training; generation needs the KV cache
        if lora_weights:
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, lora_weights)
            except (RuntimeError, ValueError, KeyError) as error:
                raise ValueError(f"--lora_weights {lora_weights}: does not fit --base_model {base_model} "
                                 f"({first_line(error)}); pass the base model the adapter was trained on") from None
        self.model = model.eval()
        self.name = Path(lora_weights).name if lora_weights else Path(base_model).name
        self.context_length = getattr(model.config, "max_position_embeddings", 2048)
        self.lock = threading.Lock()  # one generation at a time: concurrent callers queue, never interleave

    def prompt_ids(self, prompt: str) -> list[int]:
        """Exactly the training layout: [BOS] + the prompt's tokens, nothing appended."""
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def build_prompt(self, instruction: str, input: str = "") -> str:
        return self.template.prompt(instruction, input)

    def answer(self, prompts: list[str], sampling: Sampling, seed: int | None = None, streamer=None,
               stop_event: threading.Event | None = None, stop: tuple[str, ...] = ()) -> list[Answer]:
        """Answer a batch: left-padded with an attention mask, so each answer equals the prompt answered alone.
        Generation ends at EOS, at max_new_tokens, when `stop_event` is set (the caller left), or once the text
        holds one of the `stop` strings, which is cut off with what follows it (as OpenAI's API does)."""
        ids = [self.prompt_ids(p) for p in prompts]
        width = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=self.device)
        from transformers import StoppingCriteriaList

        criteria = _StopCriteria(stop_event, stop, self.tokenizer, width)
        with self.lock, torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer,
                                         stopping_criteria=StoppingCriteriaList([criteria]), pad_token_id=pad,
                                         eos_token_id=self.tokenizer.eos_token_id, **sampling.generate_kwargs())
        answers = []
        for row, prompt_ids in enumerate(ids):
            new = output[row, width:].tolist()
            stopped = self.tokenizer.eos_token_id in new
            if stopped:
                new = new[:new.index(self.tokenizer.eos_token_id)]
            while new and new[-1] == pad:
                new.pop()
            # only the new tokens are decoded, so the answer needs no cutting at the response marker
            text, cut = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), stop)
            answers.append(Answer(text=text.strip(), prompt_tokens=len(prompt_ids), completion_tokens=len(new),
                                  finish_reason="stop" if stopped or cut else "length"))
        return answers

    def stream(self, prompt: str, sampling: Sampling, seed: int | None = None,
               stop_event: threading.Event | None = None, stop: tuple[str, ...] = ()):
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
                result["answer"] = self.answer([prompt], sampling, seed, streamer, stop_event, stop)[0]
            except Exception as error:  # surfaced to the caller below
                result["error"] = error
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        text, sent, found = "", 0, False
        held_back = max((len(s) for s in stop), default=1) - 1  # the longest stop string but its last character
        for piece in streamer:
            if found:
                continue  # generation is ending; the rest is not wanted
            text += piece
            shown, found = cut_at_stop(text, stop)
            safe = len(shown) if found else max(sent, len(text) - held_back)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
            if found:
                stop_event.set()
        thread.join()
        if "error" in result:
            raise result["error"]
        if not found and sent < len(text):
            yield text[sent:]  # held back, and no stop string came
        yield result["answer"]


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


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
