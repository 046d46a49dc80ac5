"""Chat templates: where a checkpoint keeps them, and rendering them in a sandbox the way transformers does."""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from pathlib import Path

from kiln.errors import ArtifactError, InputError
from kiln.files import read_json


def chat_template_from(directory: str | os.PathLike, name: str = "default") -> str | None:
    """The checkpoint's chat template, where transformers looks: ``chat_template.jinja`` (transformers >= 4.50 saves
    it there and prefers it), else ``tokenizer_config.json`` "chat_template" (a string, or a list of named templates
    of which ``name`` is picked). None when there is none."""
    directory = Path(directory)
    if name == "default" and (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if (directory / "additional_chat_templates" / f"{name}.jinja").is_file():
        return (directory / "additional_chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return None
    template = read_json(path, "Restore it from the checkpoint.").get("chat_template")
    if isinstance(template, list):
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in template):
            raise ArtifactError(f"{path} 'chat_template' must be a string or a list of {{\"name\", \"template\"}} "
                                "strings. Restore it from the checkpoint.")
        named = {t["name"]: t["template"] for t in template}
        if name not in named:
            raise InputError(f"{path} has chat templates {sorted(named)} but none named {name!r}; pass one of those.")
        return named[name]
    if template is not None and not isinstance(template, str):
        raise ArtifactError(f"{path} 'chat_template' must be a string, found {type(template).__name__}. Restore it "
                            "from the checkpoint.")
    return template


def render_chat(messages: list[dict], template: str, *, add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "", **extra) -> str:
    """Render a conversation like transformers' ``apply_chat_template(tokenize=False)``.

    Templates come from the Hub and are untrusted code, hence the immutable sandbox; the environment (trim_blocks,
    lstrip_blocks, loop controls, ``tojson``, ``raise_exception``, ``strftime_now``) matches transformers' so the same
    template renders the same text. Keys whose value is None are dropped, as transformers does: templates test
    ``'key' in message``. ``extra`` reaches the template as variables (tools, documents, other special tokens)."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    variables = {"tools": None, "documents": None, "bos_token": bos_token, "eos_token": eos_token, **extra}
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)


@functools.lru_cache(maxsize=8)  # a pipeline renders every prompt with the same template
def _compile(template: str):
    return _environment().from_string(template)


def _environment():
    import jinja2  # imported on first use: only chat needs it
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which would change the prompt
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"Chat templates cannot set {name!r} on a namespace.")

    class Namespace(jinja2.utils.Namespace):
        # Underscore names could reach CPython internals from inside the sandbox (transformers blocks them too)
        def __init__(*args, **kwargs):  # jinja's signature trick, so that namespace(self=...) works
            for name in dict(*args[1:], **kwargs):
                check_name(name)
            jinja2.utils.Namespace.__init__(*args, **kwargs)

        def __setitem__(self, name, value):
            check_name(name)
            super().__setitem__(name, value)

    class Generation(jinja2.ext.Extension):
        # {% generation %} marks assistant text for transformers' assistant masks; rendering just keeps the body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env
