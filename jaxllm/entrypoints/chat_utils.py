"""`--chat-template` and `LLM.chat(chat_template=...)`: a file, or the Jinja template itself (as vLLM)."""

from __future__ import annotations

import codecs
from pathlib import Path

_JINJA_CHARS = "{}\n"


def load_chat_template(chat_template: str | Path | None) -> str | None:
    """The template text for `chat_template`: a file's contents, or the string itself when it holds Jinja
    (a one-line template from a shell may spell newlines as `\\n`; they are unescaped as vLLM does).
    The template is parsed here, so a broken one fails at start, naming the flag."""
    if chat_template is None:
        return None
    path = Path(chat_template)
    text = None
    try:
        if path.is_file():
            text = path.read_text(encoding="utf-8")
    except OSError:  # a long inline template is not a valid path name
        pass
    if text is None:
        chat_template = str(chat_template)
        if not any(c in chat_template for c in _JINJA_CHARS):
            raise ValueError(f"No such file: {chat_template!r} (nor is it an inline template: it holds no Jinja)")
        text = codecs.decode(chat_template.encode("latin-1", "backslashreplace"), "unicode_escape")
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template is not a valid Jinja template: {e.message} (line {e.lineno})") from None
    return text


def text_messages(conversation: list[dict], where: str = "messages") -> list[dict]:
    """Messages with each content as one string, as vLLM renders them for a string-content template:
    a list of {"type": "text", "text": ...} parts is joined with newlines; other part types are refused."""
    out = []
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"{where}[{i}] must be a dict with a 'role'")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"{where}[{i}].content[{j}]: only {{'type': 'text', 'text': ...}} parts are "
                                     "supported (jaxllm serves text-only models)")
                texts.append(part["text"])
            message = {**message, "content": "\n".join(texts)}
        out.append(message)
    return out
