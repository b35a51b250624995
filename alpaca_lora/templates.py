"""Prompt templates: JSON files that turn an {instruction, input} row into the prompt text.

A template has four fields: `description`, `prompt_input` (used when the row has a non-empty input),
`prompt_no_input`, and `response_split` (the marker after which the model's answer starts; generation
cuts the decoded text there). Training and generation build prompts with the same `PromptTemplate.prompt`.
"""

import json
from dataclasses import dataclass
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_folder(name: str, packaged_name: str) -> Path:
    """A folder of the project's own files: beside the package in a source checkout, inside it (as
    `packaged_name`, mapped in pyproject.toml) in an installed wheel."""
    beside, inside = _PACKAGE_DIR.parent / name, _PACKAGE_DIR / packaged_name
    return inside if inside.is_dir() and not beside.is_dir() else beside


TEMPLATES_DIR = shipped_folder("templates", "prompt_templates")
TEMPLATE_FIELDS = ("description", "prompt_input", "prompt_no_input", "response_split")


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    description: str
    prompt_input: str
    prompt_no_input: str
    response_split: str

    def prompt(self, instruction: str, input: str | None = None) -> str:
        """The prompt text for one row; everything the model must not be trained to produce."""
        if input is not None and input.strip():
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def response(self, generated_text: str) -> str:
        """The answer part of a decoded prompt + generation."""
        return generated_text.split(self.response_split, 1)[-1].strip()

    def to_dict(self) -> dict:
        return {field: getattr(self, field) for field in ("name",) + TEMPLATE_FIELDS}


def available_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.json"))


def load_template(name: str) -> PromptTemplate:
    """A template by name (`alpaca`) or by the path of a JSON file with the four fields."""
    path = Path(name)
    if path.suffix != ".json":
        path = TEMPLATES_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(
            f"--prompt_template_name {name!r}: no such template; "
            f"use one of {', '.join(available_templates())} or the path of a template .json file"
        )
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"template {path}: malformed JSON at line {error.lineno} column {error.colno}") from None
    missing = [f for f in TEMPLATE_FIELDS if not isinstance(fields.get(f), str)]
    if missing:
        raise ValueError(f"template {path}: missing or non-string field(s) {', '.join(missing)}")
    if not ("{instruction}" in fields["prompt_input"] and "{input}" in fields["prompt_input"]
            and "{instruction}" in fields["prompt_no_input"]):
        raise ValueError(f"template {path}: prompt_input needs {{instruction}} and {{input}}, prompt_no_input {{instruction}}")
    return PromptTemplate(name=path.stem, **{f: fields[f] for f in TEMPLATE_FIELDS})
