"""Chat templates: the Jinja text that turns a conversation into the model's input, and where in it the model speaks.

A chat template is the tokenizer's own (`tokenizer`), one shipped in templates/ by name (alpaca, chatml, llama3,
gemma, mistral, phi3) or a .jinja file. `render_conversation` renders a whole conversation once and finds in the
text each assistant message and its end-of-turn marker: the template's text after the message up to and including
the first special token in it (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`, `</s>`, `<|end|>`). Those spans are
what training trains on; everything else is context. Tokens come from the whole text at once (data.py), so the
ids are the ones any inference engine makes of the same text.

How the messages are found: each assistant content is replaced by a sentinel and rendered, which shows the text the
template writes around it; the real rendering must then be that text with each content (as is, or as the template
trims it) in the sentinels' places, else the row is refused: a template that rewrites assistant messages (Qwen3
splitting off `</think>`) cannot be trained on exactly.

The prompt at inference (`prompt_text`) is the rendering of the conversation with one more assistant message, cut
where that message starts: what the model sees before an answer is, character for character, what it saw in
training before the last answer of the same conversation, also for templates that render the last turn their own
way (Qwen3's empty think block; Mistral Nemo's system message, which goes into the last user turn only).
"""

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import first_line
from .templates import TEMPLATES_DIR

TOKENIZER_TEMPLATE = "tokenizer"  # --chat_template value: the base model's tokenizer's own template
# Llama 3.2's template prints today's date (strftime_now) unless `date_string` is set, Llama 3.1's whatever
# date_string the caller passes: a template that reads the clock or that variable gets this date set at its top,
# whatever the caller passes (llama.cpp passes today's, tested), so that training, its tokenization cache, inference
# and whatever later renders the exported template (transformers, llama.cpp, vLLM) produce the same text on any day.
# It is the date Llama 3.1's template falls back to; transformers passes templates no functions, so strftime_now
# itself cannot be replaced.
FIXED_DATE = "26 Jul 2024"
_SET_FIXED_DATE = "{%- set date_string = \"" + FIXED_DATE + "\" -%}\n"
# Templates with a thinking switch (Qwen3, SmolLM3) write a trained answer after an empty think block (rows carry no
# reasoning); whether their generation prompt writes that block depends on `enable_thinking`, which llama.cpp and
# vLLM pass as true. It is set at the template's top to the value that makes the generation prompt training's.
_SET_THINKING = "{%- set enable_thinking = "
_SENTINEL = "\ue000assistant message {}\ue001"  # private-use characters, which no template trims or escapes


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # "tokenizer", a shipped name, or the .jinja path
    source: str  # the Jinja text

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source}


def available_chat_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))


def check_chat_template_name(name: str) -> None:
    """An unknown --chat_template fails before anything is loaded."""
    if name in ("", TOKENIZER_TEMPLATE) or name in available_chat_templates():
        return
    if not name.endswith(".jinja"):
        raise ValueError(f"--chat_template {name!r}: no such template; use {TOKENIZER_TEMPLATE} (the tokenizer's own), "
                         f"one of {', '.join(available_chat_templates())}, or the path of a .jinja file")
    if not Path(name).expanduser().is_file():
        raise ValueError(f"--chat_template {name}: no such file; pass the path of a .jinja chat template")


def load_chat_template(name: str, tokenizer) -> ChatTemplate:
    """The template --chat_template names; `tokenizer` for the tokenizer's own, which must have one."""
    check_chat_template_name(name)
    if name == TOKENIZER_TEMPLATE:
        source = tokenizer.chat_template
        if not isinstance(source, str) or not source:
            raise ValueError(f"--chat_template {name}: the base model's tokenizer has no chat template (base models "
                             f"ship without one); pass one of {', '.join(available_chat_templates())}")
    else:
        path = Path(name).expanduser() if name.endswith(".jinja") else TEMPLATES_DIR / f"{name}.jinja"
        name, source = (name if name.endswith(".jinja") else path.stem), path.read_text(encoding="utf-8")
    # the settings go on top once: a saved adapter's template already has them
    source = source.removeprefix(_SET_FIXED_DATE)
    if "enable_thinking" in source and not source.startswith(_SET_THINKING):
        source = _thinking_fixed(name, source, tokenizer)
    if "strftime_now" in source or "date_string" in source:
        source = _SET_FIXED_DATE + source
    return ChatTemplate(name, source)


def _thinking_fixed(name: str, source: str, tokenizer) -> str:
    """The source with `enable_thinking` set at its top to the value under which the template's own generation prompt
    is training's prompt (see _SET_THINKING); unchanged where neither value gives it."""
    probe = [{"role": "user", "content": "Hi"}]
    for value in ("false", "true"):
        fixed = ChatTemplate(name, f"{_SET_THINKING}{value} -%}}\n{source}")
        try:
            generation_prompt = tokenizer.apply_chat_template(probe, chat_template=fixed.source, tokenize=False,
                                                              add_generation_prompt=True)
        except Exception:  # the template's own error shows when it is rendered for training
            return source
        if generation_prompt == prompt_text(fixed, tokenizer, probe):
            return fixed.source
    return source


def chat_template_for(name: str, tokenizer, conversations: bool) -> ChatTemplate | None:
    """--chat_template resolved: the template it names; left out, the tokenizer's own for conversation data and
    none for Alpaca rows (which then keep their Alpaca prompt template)."""
    if name:
        return load_chat_template(name, tokenizer)
    if not conversations:
        return None
    if not tokenizer.chat_template:
        raise ValueError(f"--chat_template: the data are conversations and the base model's tokenizer has no chat "
                         f"template; pass --chat_template with one of {', '.join(available_chat_templates())} "
                         "or a .jinja path")
    return load_chat_template(TOKENIZER_TEMPLATE, tokenizer)


def render(template: ChatTemplate, tokenizer, messages: list[dict]) -> str:
    """The template's text for `messages`; a template that raises (e.g. no system role) is a ValueError. (Prompts
    are cut from a rendering, never made with add_generation_prompt: see prompt_text.)"""
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template.source, tokenize=False)
    except Exception as error:  # jinja's TemplateError from raise_exception, or any error in the template's code
        raise ValueError(f"chat template {template.name}: {first_line(error)}") from None


@dataclass(frozen=True)
class RenderedConversation:
    text: str
    spans: list[tuple[int, int]]  # [start, end) of each assistant message + its end-of-turn marker, in order


def render_conversation(template: ChatTemplate, tokenizer, messages: list[dict]) -> RenderedConversation:
    """The whole conversation's text and where the model speaks in it (see the module's docstring)."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    sentinels = [_SENTINEL.format(k) for k in range(len(assistant))]
    masked = [dict(m) for m in messages]
    for k, i in enumerate(assistant):
        masked[i]["content"] = sentinels[k]
    skeleton, text = render(template, tokenizer, masked), render(template, tokenizer, messages)
    if messages[0]["role"] == "system" and messages[0]["content"].strip() not in text:
        # Mistral Nemo's writes it only into a conversation's final user message, which training never has
        raise ValueError(f"chat template {template.name}: it leaves out the system message of a conversation that "
                         "ends with an answer, so the model would not be trained with it; drop system messages")
    pieces = re.split("|".join(map(re.escape, sentinels)), skeleton)
    if len(pieces) != len(sentinels) + 1:
        raise ValueError(f"chat template {template.name}: it does not write each assistant message once")
    if not text.startswith(pieces[0]):
        raise ValueError(f"chat template {template.name}: its text before the first assistant message depends on "
                         "that message, so it cannot be trained on exactly")
    specials = _special_token_pattern(tokenizer)
    spans, cursor = [], len(pieces[0])
    for k, i in enumerate(assistant):
        content, after = messages[i]["content"], pieces[k + 1]
        written = next((c for c in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip(),
                                                  content.lstrip("\n"), content.strip("\n")))
                        if text.startswith(c + after, cursor)), None)
        if written is None:
            raise ValueError(f"chat template {template.name}: it rewrites assistant message {k + 1} (more than "
                             "trimming it), so it cannot be trained on exactly; train on content it writes as is")
        marker = specials.search(after)
        if marker is None:
            raise ValueError(f"chat template {template.name}: it writes no special token of this tokenizer after an "
                             f"assistant message ({after[:40]!r}), so the model would never learn to stop; use a "
                             "template whose end-of-turn marker is in the tokenizer's vocabulary")
        spans.append((cursor, cursor + len(written) + marker.end()))
        cursor += len(written) + len(after)
    return RenderedConversation(text, spans)


def prompt_text(template: ChatTemplate, tokenizer, messages: list[dict]) -> str:
    """The text before the answer to `messages` (which end with a user message), as training renders it."""
    sentinel = _SENTINEL.format("answer")
    text = render(template, tokenizer, list(messages) + [{"role": "assistant", "content": sentinel}])
    return text[:text.index(sentinel)]


def end_of_turn_ids(template: ChatTemplate, tokenizer) -> list[int]:
    """The tokens that end an answer: the template's end-of-turn marker and the tokenizer's EOS."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rendered = render_conversation(template, tokenizer, probe)
    start, end = rendered.spans[-1]
    marker = _special_token_pattern(tokenizer).search(rendered.text, start + len("Hello"), end)
    ids = [tokenizer.convert_tokens_to_ids(marker.group()), tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


def bos_ids(tokenizer, text: str = "") -> list[int]:
    """[BOS] where the model expects one and `text` does not already start with it, else []: BOS exactly once.

    A tokenizer whose BOS is its EOS (GPT-2 style, Qwen's as llama.cpp stores it) has no real BOS; the flags that
    say whether to add it are lost by some loaders (Llama 3's from GGUF), so they are not asked."""
    bos = tokenizer.bos_token_id
    if bos is None or bos == tokenizer.eos_token_id or (text and text.startswith(tokenizer.bos_token)):
        return []
    return [bos]


def starts_with_special_token(tokenizer, text: str) -> bool:
    return _special_token_pattern(tokenizer).match(text) is not None


def _special_token_pattern(tokenizer) -> re.Pattern:
    return _special_pattern(tuple(sorted(_special_tokens(tokenizer), key=len, reverse=True)))


def _special_tokens(tokenizer) -> set[str]:
    added = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return (added | set(tokenizer.all_special_tokens)) - {""}


@lru_cache(maxsize=16)
def _special_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, tokens)))
