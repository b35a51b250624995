"""The package's shape: imports flow one way (no circles), a row's path to the loss goes data -> batching -> loss,
the engines import no command-line layer, and no module grows past what a reader takes in at once."""

import ast

from conftest import REPO

PACKAGE = REPO / "alpaca_lora"
MOST_LINES = 350


def _imports() -> dict[str, set[str]]:
    """module -> the package modules it imports, at the top or inside a function."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found.add(node.module)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alpaca_lora."):
                found.add(node.module.split(".")[1])
        graph[path.stem] = found
    return graph


def _reaches(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_circles():
    graph = _imports()
    assert len(graph) > 20 and graph["train"] >= {"data", "batching", "loss", "evaluation", "checkpoints"}
    circles = sorted(module for module in graph if module in _reaches(graph, module))
    assert circles == []


def test_imports_flow_one_way():
    graph = _imports()
    below = {  # a module must not reach any of these
        "templates": {"data", "chat_template"}, "chat_template": {"data", "conversations", "model"},
        "conversations": {"data", "chat_template"}, "data": {"batching", "loss", "train", "model"},
        "tokenized_cache": {"batching", "train"}, "batching": {"loss", "evaluation", "train"},
        "loss": {"batching", "evaluation", "train"}, "evaluation": {"train"}, "config": {"train", "model"},
        "generate": {"server", "openai_schema", "generate_cli", "train", "batcher"}, "server": {"generate_cli"},
        "batcher": {"server", "openai_schema", "generate_cli"},
        "mixed_adapters": {"generate", "batcher", "server", "model", "adapter_folder"},
        "openai_schema": {"server", "generate_cli"},
        "llama_layout": {"export", "gguf_export"}, "gguf_export": {"export"},
        "gguf_vocabulary": {"export", "gguf_export"}, "llama_cpp_checks": {"export", "gguf_export"}, "adapter_folder": {"train", "generate"},
        "rms_norm": {"model", "loss", "train"}, "compiled": {"loss", "rms_norm", "model", "train"},
        "cpu_attention": {"model", "loss", "train"},
    }
    wrong = {module: sorted(_reaches(graph, module) & banned) for module, banned in below.items()
             if _reaches(graph, module) & banned}
    assert wrong == {}


def test_no_module_is_longer_than_a_reader_takes_in():
    lengths = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert {name: n for name, n in lengths.items() if n > MOST_LINES} == {}


def test_the_scripts_are_command_line_glue():
    for script in ("finetune.py", "generate.py", "export_hf.py", "self_instruct.py", "evaluate.py", "make_demo_model.py"):
        text = (REPO / script).read_text()
        assert len(text.splitlines()) <= 10 and "from alpaca_lora.console import" in text, script
