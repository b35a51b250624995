"""Mixed adapters: several LoRA adapters of one base loaded together, each request answered through its own.

peft computes a batch whose rows use different adapters (the LoRA layers' `adapter_names`: the base layer once for
every row, each adapter's low-rank update only on its rows; "__base__" rows get none). peft attaches those names with
hooks registered for the length of one generate() call, on modules every thread shares; the server runs its batch's
thread and one-at-a-time generation side by side, so here the names come from a setting of the calling thread
instead, and go per token: a continuous batch lays all its requests' tokens out in one row (1 x tokens), which the
hooks hand to peft as tokens x 1, so that each token goes through its own request's adapter.
"""

import threading
from contextlib import contextmanager

BASE = "__base__"  # peft's name for the base model without any adapter


def parse_adapters(lora_weights: str) -> dict[str, str]:
    """--lora_weights as {name: folder}: 'folder' (named after the folder), or 'name=folder,name=folder,...'."""
    from pathlib import Path

    if "=" not in lora_weights:
        return {Path(lora_weights).name: lora_weights} if lora_weights else {}
    adapters = {}
    for pair in lora_weights.split(","):
        name, _, folder = pair.strip().partition("=")
        if not name or not folder or name == BASE:
            raise ValueError(f"--lora_weights {lora_weights!r}: {pair.strip()!r} is not name=folder; pass "
                             "'name=folder,name=folder' (or one folder)")
        if name in adapters:
            raise ValueError(f"--lora_weights {lora_weights!r}: the name {name!r} is given twice; name each adapter "
                             "once")
        adapters[name] = folder
    return adapters


class AdapterRouting:
    """Hooks on every LoRA layer of a peft model that pass peft the adapter of each input row (or token), as the
    calling thread set it with `through`; a thread that set nothing runs the layers as peft would."""

    def __init__(self, model):
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self._local = threading.local()
        for module in model.modules():
            if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):  # LoRA layers and modules_to_save copies
                module.register_forward_pre_hook(self._before, with_kwargs=True)
                module.register_forward_hook(self._after)

    def route(self, names: str | list[str] | None) -> None:
        """From now on, run this thread's forward passes through one adapter (a name), or one per token (a list as
        long as the tokens of the one row a continuous batch passes); None: as peft would."""
        if isinstance(names, list) and len(set(names)) == 1:  # one adapter throughout: by rows, as they are
            names = names[0]
        self._local.names, self._local.shapes = names, []

    @contextmanager
    def through(self, names: str | list[str]):
        """`route` for the length of a block."""
        self.route(names)
        try:
            yield
        finally:
            self.route(None)

    def _before(self, module, args, kwargs):
        names = getattr(self._local, "names", None)
        if names is None:
            return None
        x, *rest = args
        # a linear layer's input ends with its features; an embedding's is token ids only
        leading = x.shape[:-1] if x.is_floating_point() else x.shape
        tokens = leading.numel()
        if isinstance(names, str):  # one adapter for every row: peft's batch form, unsplit
            self._local.shapes.append(None)
            return args, {**kwargs, "adapter_names": [names] * len(x)}
        if len(names) != tokens:
            raise RuntimeError(f"adapter routing: {len(names)} adapter names for {tokens} tokens")
        self._local.shapes.append(leading)
        return (x.reshape(tokens, 1, *x.shape[len(leading):]), *rest), {**kwargs, "adapter_names": names}

    def _after(self, module, args, output):
        if getattr(self._local, "names", None) is None:
            return None
        leading = self._local.shapes.pop()
        return None if leading is None else output.reshape(*leading, output.shape[-1])


def check_servable_together(adapters: dict) -> None:
    """Adapters served together share one base and one prompt layout (the server renders a request's prompt before
    it picks the adapter, and the bare base is prompted the same way): a difference is an error naming both."""
    from pathlib import Path

    def where(base: str) -> str:  # a local folder named two ways is one base
        path = Path(base).expanduser()
        return str(path.resolve()) if path.exists() else base

    (first_name, first), *others = adapters.items()
    for name, other in others:
        for what, mine, theirs in (("base model", where(first.base_model), where(other.base_model)),
                                   ("Alpaca template", first.prompt_template, other.prompt_template),
                                   ("chat template", first.chat_template, other.chat_template)):
            if mine != theirs:
                raise ValueError(f"--lora_weights: {name}={other.folder} was trained with the {what} "
                                 f"{_short(theirs)}, {first_name}={first.folder} with {_short(mine)}; serve together "
                                 "only adapters of one base and one prompt layout (run one server per layout)")


def _short(value) -> str:
    if isinstance(value, dict):  # a chat template: its name, not its source
        return repr(value.get("name"))
    return repr(value)
