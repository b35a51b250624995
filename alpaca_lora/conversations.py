"""Conversations: the shapes a data row comes in, read into one list of {role, content} messages, and checked.

    {"instruction", "input", "output"}                                               an Alpaca row (one turn)
    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}   OpenAI's shape
    {"conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...]}     ShareGPT's shape

The order checked is the one chat templates need: an optional system message first, then user and assistant
messages in turn, starting with a user message and ending with an assistant message (a last user message would
have nothing to train on). The template itself may refuse more (Gemma 2's has no system role); data.py renders
each row to find out.
"""

ALPACA, MESSAGES, SHAREGPT = "an Alpaca row", "a `messages` conversation", "a ShareGPT `conversations` row"
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def row_shape(row) -> str | None:
    """ALPACA, MESSAGES, SHAREGPT, or None for a row that is none of them."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return MESSAGES
    if "conversations" in row:
        return SHAREGPT
    if "instruction" in row or "output" in row:
        return ALPACA
    return None


def conversation_problem(row: dict) -> str | None:
    """Why a `messages` or `conversations` row cannot be trained on, or None."""
    shape = row_shape(row)
    key, role_key, content_key = ("messages", "role", "content") if shape == MESSAGES else ("conversations", "from", "value")
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        return f"'{key}' must be a non-empty list"
    roles = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            return f"{key} {number} is not an object"
        role, content = turn.get(role_key), turn.get(content_key)
        known = SHAREGPT_ROLES if shape == SHAREGPT else {r: r for r in ("system", "user", "assistant")}
        if role not in known:
            return f"{key} {number}: '{role_key}' {role!r} is not one of {', '.join(known)}"
        if not isinstance(content, str):
            return f"{key} {number}: '{content_key}' is missing or not a string"
        if not content.strip():
            return f"{key} {number}: the {known[role]} message is empty"
        roles.append(known[role])
    return _order_problem(roles, key)


def _order_problem(roles: list[str], key: str) -> str | None:
    turns = roles[1:] if roles[0] == "system" else roles
    if "system" in turns:
        return f"{key}: a system message may only come first"
    expected = ["user", "assistant"] * len(turns)
    for number, (role, wanted) in enumerate(zip(turns, expected), start=len(roles) - len(turns) + 1):
        if role != wanted:
            return f"{key} {number}: role {role!r} where {wanted!r} belongs (user and assistant take turns)"
    if not turns:
        return f"{key}: no user message"
    if turns[-1] != "assistant":
        return f"{key}: it ends with a user message; the last message must be the assistant's, to train on"
    return None


def conversation_of(row: dict) -> list[dict]:
    """The messages of a checked row as [{role, content}]; an Alpaca row becomes one turn (instruction and input as
    the user message)."""
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if "conversations" in row:
        return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]
    return [{"role": "user", "content": user_message(row["instruction"], row.get("input") or "")},
            {"role": "assistant", "content": row["output"]}]


def user_message(instruction: str, input: str = "") -> str:
    """An Alpaca instruction and its optional input as one user message."""
    return f"{instruction}\n\n{input}" if input and input.strip() else instruction
