"""torch.compile for a plain tensor function, with the function itself as the fallback."""

import warnings

import torch


class CompiledOrEager:
    """torch.compile(function), or the function itself where compiling fails here (no C++ compiler for a CPU
    kernel, no Triton for a GPU one): same numbers, slower. Warns once."""

    def __init__(self, function):
        self.function, self.compiled = function, torch.compile(function, dynamic=True)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as error:  # torch._dynamo.exc.BackendCompilerFailed and its kin
                warnings.warn(f"{self.function.__name__} runs uncompiled (slower): torch.compile failed here: "
                              f"{str(error).splitlines()[0] if str(error) else type(error).__name__}")
                self.compiled = None
        return self.function(*args)
