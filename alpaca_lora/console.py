"""Console entry points: the one place that reads the command line and turns errors into an exit status.

Each entry builds a fire command from a config dataclass, so `--help` lists every field with its default
and help text, and turns a ValueError (the package's way of saying "bad input") into one line on stderr.
"""

import dataclasses
import difflib
import functools
import inspect
import logging
import sys
import warnings


def _fire_command(config_cls, run, summary: str):
    """A keyword-only function with config_cls's fields as flags, for fire; returns None so fire prints nothing."""

    def command(**flags):
        run(config_cls(**flags))  # fire would print a returned value

    fields = dataclasses.fields(config_cls)
    command.__signature__ = inspect.Signature([
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in fields])
    command.__doc__ = summary + "\n\nArgs:\n" + "".join(f"    {f.name}: {f.metadata.get('help', '')}\n" for f in fields)
    command.help_text = lambda prog: _help_text(prog, summary, fields)
    return command


def _help_text(prog: str, summary: str, fields) -> str:
    """Every flag with its type, its whole default and its help (fire's own help cuts defaults at 72 columns and
    calls a flag that may be left out for auto `Optional[bool | None]`)."""
    lines = [f"{prog}: {summary}", "", f"usage: {prog} --flag value ...", "", "flags:"]
    for f in fields:
        kind = getattr(f.type, "__name__", str(f.type)).replace("object", "names, e.g. '[q_proj,v_proj]'")
        kind = "bool, or left out for auto" if kind == "bool | None" else kind.replace(" | None", ", or left out")
        lines += [f"  --{f.name}={f.name.upper()}", f"      {f.metadata.get('help', '')}",
                  f"      Type: {kind}.  Default: {f.default!r}"]
    return "\n".join(lines)


def _run(prog: str, config_cls, run, summary: str) -> None:
    _fire(prog, _fire_command(config_cls, run, summary))


def _fire(prog: str, component, argv=None) -> None:
    import fire

    _quiet_library_notices()
    argv = sys.argv[1:] if argv is None else argv
    if hasattr(component, "help_text") and ("--help" in argv or "-h" in argv):
        print(component.help_text(prog))
        return
    try:
        check_flags(prog, component, argv)
        fire.Fire(component, command=argv, name=prog)
    except ValueError as error:
        sys.exit(f"{prog}: error: {error}")
    except OSError as error:  # a full disk, a folder gone: what the system said, about which file
        sys.exit(f"{prog}: error: {error.filename + ': ' if error.filename else ''}{error.strerror or error}")


def check_flags(prog: str, component, argv: list[str]) -> None:
    """Every --flag must name a parameter of the command: checked before any work is done, with the closest
    valid flag named (fire itself complains about an unknown flag only after the command has run, hours
    later for a training run)."""
    if isinstance(component, dict):  # a command with subcommands (evaluate.py loss|answer|judge)
        if not argv or argv[0].startswith("-"):
            return
        if argv[0] not in component:
            raise ValueError(f"{argv[0]!r}: no such command; use one of {', '.join(component)}")
        prog, component, argv = f"{prog} {argv[0]}", component[argv[0]], argv[1:]
    parameters = inspect.signature(component).parameters.values()
    names = [p.name for p in parameters]
    takes_positional = any(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters)
    follows_flag = False  # the previous word was a flag that may take this word as its value
    for word in argv:
        if word == "--":  # fire's own flags follow
            return
        if word in ("-h", "--help"):
            follows_flag = False
            continue
        if word.startswith("-") and not word.startswith("--") and len(word) == 2:  # fire's -x short flags
            follows_flag = True
        elif word.startswith("--"):
            name = word[2:].split("=", 1)[0].replace("-", "_")
            if name not in names and not (name.startswith("no") and name[2:] in names):
                close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
                raise ValueError(f"--{name}: no such flag" + (f"; did you mean --{close[0]}?" if close else "")
                                 + f" ({prog} --help lists them)")
            follows_flag = "=" not in word
        elif not follows_flag and not takes_positional:
            raise ValueError(f"{word!r}: a value without a flag; flags are written --name value")
        else:
            follows_flag = False


def _quiet_library_notices() -> None:
    """Silence two notices that every run printed and no user can act on: peft reads a transformers property
    that transformers 5 deprecates, and bitsandbytes, on a CPU with AVX512-BF16, says it found no optional
    `kernels` package for 4-bit inference (the 4-bit path here works without it)."""
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def finetune() -> None:
    from .config import TrainConfig
    from .train import train

    _run("finetune.py", TrainConfig, train, "Fine-tune a LLaMA-family model with LoRA on Alpaca-format data.")


def make_demo_model() -> None:
    from .demo import DemoConfig, build_demo_model

    _run("make_demo_model.py", DemoConfig, build_demo_model,
         "Build a tiny LLaMA-architecture model and tokenizer locally, for the demo and tests.")


def generate() -> None:
    from .generate_cli import GenerateConfig, run_generate

    _run("generate.py", GenerateConfig, run_generate,
         "Answer instructions with a base model + LoRA adapter: one-shot, interactive, batch file, or an "
         "OpenAI-compatible server with a web page.")


def export() -> None:
    from .export import ExportConfig, export

    _run("export_hf.py", ExportConfig, export,
         "Merge a LoRA adapter into its base model and export it: a Hugging Face folder, a GGUF file for llama.cpp, "
         "or Meta's checkpoint layout, each verified before it is written.")


def self_instruct() -> None:
    from .self_instruct import SelfInstructConfig, clean_file, regenerate

    if sys.argv[1:2] == ["clean"]:
        def clean(input_path: str, output_path: str):
            """Clean an Alpaca-format file: python self_instruct.py clean IN.json OUT.json"""
            clean_file(input_path, output_path)
        return _fire("self_instruct.py clean", clean, sys.argv[2:])
    _run("self_instruct.py", SelfInstructConfig, regenerate,
         "Regenerate Alpaca-style instruction data through an OpenAI-compatible API (OPENAI_API_KEY), or "
         "'self_instruct.py clean IN OUT' to clean a data file.")


def _quiet(function):
    """The same command for fire, without the return value fire would print and without the `write` hook
    that tests pass (not a flag)."""
    @functools.wraps(function)
    def command(*args, **kwargs):
        function(*args, **kwargs)
    signature = inspect.signature(function)
    command.__signature__ = signature.replace(parameters=[p for p in signature.parameters.values()
                                                          if p.name not in ("write", "read")])
    return command


def evaluate() -> None:
    from .evaluate import JudgeConfig, answer_eval_file, heldout_loss, judge
    from .harness import HarnessConfig, run_harness

    _fire("evaluate.py", {
        "loss": _quiet(heldout_loss),
        "answer": _quiet(answer_eval_file),
        "judge": _fire_command(JudgeConfig, judge, "Blind pairwise comparison of our answers against reference "
                                                   "answers, by a judge model or by you."),
        "harness": _fire_command(HarnessConfig, run_harness, "lm-evaluation-harness tasks on base + adapter, "
                                                             "in-process; the scores go into the model card."),
    })
