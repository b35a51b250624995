"""torch.compile for a plain tensor function, with the function itself for small inputs and as the fallback."""

import warnings

import torch


class CompiledOrEager:
    """torch.compile(function) where its first argument has at least `compile_from` elements; the function itself
    for smaller ones (compiling costs seconds once per process, more than a tiny model's tensors ever take) and
    wherever compiling fails here (no C++ compiler for a CPU kernel, no Triton for a GPU one): same numbers,
    slower. Warns once."""

    def __init__(self, function, compile_from: int):
        self.function, self.compile_from = function, compile_from
        self.compiled = torch.compile(function, dynamic=True)

    def __call__(self, *args):
        if self.compiled is not None and args[0].numel() >= self.compile_from:
            try:
                return self.compiled(*args)
            except Exception as error:  # torch._dynamo.exc.BackendCompilerFailed and its kin
                warnings.warn(f"{self.function.__name__} runs uncompiled (slower): torch.compile failed here: "
                              f"{str(error).splitlines()[0] if str(error) else type(error).__name__}")
                self.compiled = None
        return self.function(*args)
