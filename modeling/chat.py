"""A model directory's chat template, rendered exactly as `transformers`' `apply_chat_template`.

The template comes from where `AutoTokenizer.from_pretrained` finds it: `chat_template.jinja`
(and named ones in `additional_chat_templates/`), else `tokenizer_config.json`'s `chat_template`
(a string, or a list of `{"name", "template"}`); with several, the one named `default`. It renders
in the same jinja2 environment transformers builds (sandboxed, immutable, `trim_blocks`,
`lstrip_blocks`, the `loopcontrols` extension, and its `raise_exception`, `strftime_now`,
`tojson`, `dict` and `namespace`), with the same variables: `messages`, `tools` and `documents`
(None), `add_generation_prompt`, and the tokenizer's named special tokens as strings
(`bos_token`, `eos_token`, ...). The rendered text already holds the BOS a template writes, so it
is encoded without adding one (transformers tokenizes it with `add_special_tokens=False`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# transformers' named special tokens (`PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES`).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class ChatTemplateError(ValueError):
    """The template cannot be used (it does not compile, or none is the default), or it refused
    these messages (its own `raise_exception`, or an error rendering them)."""


def find_templates(directory: str | Path) -> dict[str, str]:
    """The directory's chat templates by name (`default` for the unnamed one); {} for none."""
    directory = Path(directory)
    templates: dict[str, str] = {}
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    extra = directory / CHAT_TEMPLATE_DIR
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
    if templates:  # files win over tokenizer_config.json, as in transformers
        return templates
    value = _read_json(directory / TOKENIZER_CONFIG).get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {
            str(t["name"]): str(t["template"])
            for t in value
            if isinstance(t, dict) and "name" in t and "template" in t
        }
    return {}


def special_tokens(directory: str | Path) -> dict[str, str]:
    """The named special tokens a template sees, as transformers' `special_tokens_map` has them:
    the standard names and any other `*_token` in tokenizer_config.json (and in its
    `extra_special_tokens` mapping); `special_tokens_map.json` where the config lists no added
    tokens (the legacy layout)."""
    directory = Path(directory)
    config = _read_json(directory / TOKENIZER_CONFIG)
    sources = [config]
    if "added_tokens_decoder" not in config:
        sources.append(_read_json(directory / SPECIAL_TOKENS_MAP))
    found: dict[str, str] = {}
    for source in sources:
        named = dict(source)
        extra = source.get("extra_special_tokens")
        if isinstance(extra, dict):
            named.update(extra)
        for key, value in named.items():
            if key not in SPECIAL_TOKEN_NAMES and not key.endswith("_token"):
                continue
            token = value.get("content") if isinstance(value, dict) else value
            if isinstance(token, str):
                found[key] = token
    return found


class ChatTemplate:
    """One compiled chat template and the special tokens it is rendered with."""

    def __init__(self, source: str, tokens: dict[str, str] | None = None) -> None:
        self.source = source
        self.tokens = dict(tokens or {})
        try:
            self._template = _environment().from_string(source)
        except Exception as err:  # jinja2's TemplateSyntaxError, and anything odder
            raise ChatTemplateError(f"the chat template does not compile: {err}") from err

    @classmethod
    def load(cls, directory: str | Path) -> ChatTemplate | None:
        """The directory's default chat template; None when it has none. ChatTemplateError when
        it has several and none is named `default`, or when it does not compile."""
        templates = find_templates(directory)
        if not templates:
            return None
        if "default" not in templates:
            raise ChatTemplateError(
                f"{directory} has chat templates {sorted(templates)} and none named 'default'"
            )
        return cls(templates["default"], special_tokens(directory))

    def render(
        self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text of `messages` (dicts of `role`, `content`, ...; keys whose value is
        None are dropped first, as transformers does). ChatTemplateError if the template raises."""
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return str(
                self._template.render(
                    messages=chat,
                    tools=None,
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                    **self.tokens,
                )
            )
        except Exception as err:
            message = f"the model's chat template refused the messages: {err}"
            raise ChatTemplateError(message) from err


def _environment() -> Any:
    """The jinja2 environment of transformers' `_compile_jinja_template`, built alike."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class TemplateDict:
        # `dict(...)` without the class itself: no attribute access to break out through.
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # Namespaces that refuse underscore-prefixed names (no route to CPython internals).
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed names: {name!r}"
                )

    class GenerationTag(jinja2.ext.Extension):
        # transformers' `{% generation %}` block (it marks assistant text for training masks);
        # rendering passes its body through unchanged.
        tags = {"generation"}  # noqa: RUF012  (jinja2 declares it so)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_body", [], [], None, None)
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}
