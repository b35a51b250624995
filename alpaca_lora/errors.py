"""How another library's exception becomes part of one of our one-line errors."""


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message, at most 200 characters; its type's name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
