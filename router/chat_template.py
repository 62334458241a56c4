"""Chat prompts: the checkpoint's Jinja2 chat template, rendered the way `transformers`'
`apply_chat_template(messages, add_generation_prompt=True, tokenize=False)` renders it.

    chat = read_chat_template(model_dir)          # ChatSettings, or None: the checkpoint has none
    prompt = ChatTemplate(chat.source, chat.tokens).render(messages)

Like transformers: a sandboxed environment with trim_blocks / lstrip_blocks and loop controls, a
`tojson` that keeps non-ASCII text, `raise_exception(msg)` and `strftime_now(fmt)` as globals, and
the tokenizer's special tokens (`bos_token`, `eos_token`, ...) as variables.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(ValueError):
    """The template refused the messages (its `raise_exception`) or failed to render them."""


@dataclass(frozen=True, slots=True)
class ChatSettings:
    source: str                          # the Jinja2 template
    tokens: tuple[tuple[str, str], ...]  # (name, text) of the special tokens it may use


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _template_source(data: Mapping[str, Any], model_dir: Path) -> str | None:
    template = data.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) and template.strip() else None


def read_chat_template(model_dir: str | Path) -> ChatSettings | None:
    """The template of a Hugging Face checkpoint directory (tokenizer_config.json's
    `chat_template`, or chat_template.jinja), or None when it has none."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    source = _template_source(data, model_dir)
    if source is None:
        return None
    tokens = tuple((name, text) for name in SPECIAL_TOKENS
                   if (text := _token_text(data.get(name))) is not None)
    return ChatSettings(source, tokens)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled template; `render(messages)` -> the prompt text, ending in the generation prompt."""

    def __init__(self, source: str, tokens: Sequence[tuple[str, str]] = ()) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.tokens = dict(tokens)
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"the model's chat template does not compile: {e}") from e

    def render(self, messages: Sequence[Mapping[str, Any]]) -> str:
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=True,
                                         tools=None, documents=None, **self.tokens)
        except TemplateError as e:
            raise ChatTemplateError(f"the model's chat template refused the messages: {e}") from e
