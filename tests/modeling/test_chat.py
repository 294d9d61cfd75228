"""Chat templates render exactly as transformers' `apply_chat_template(...,
add_generation_prompt=True)` renders them, from wherever a directory keeps its template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modeling.chat import ChatTemplate, ChatTemplateError, special_tokens
from modeling.tokenizer import load_tokenizer
from tests.modeling.hf_models import llama2_tokenizer, llama3_tokenizer, qwen2_tokenizer

transformers = pytest.importorskip("transformers")

TOKENIZERS = {
    "llama-3": llama3_tokenizer,
    "qwen2-chatml": qwen2_tokenizer,
    "llama-2": llama2_tokenizer,
}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there, café 😀"}],
    [
        {"role": "system", "content": "Be brief.\n  Indented."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because."},
        {"role": "user", "content": "<|eot_id|> and {{ not jinja }}"},
    ],
]
# A template in the style of released ones: whitespace control, namespace, tojson, loop controls,
# raise_exception, the generation block and a special token.
RICH_TEMPLATE = """{%- set ns = namespace(system='') -%}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {% set ns.system = message['content'] %}{% continue %}
    {% endif %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('bad role') }}
    {% endif %}
{{ bos_token }}[{{ message['role'] }}] {{ message['content'] | tojson }}
    {% if message['role'] == 'assistant' %}
        {% generation %}{{ message['content'] }}{% endgeneration %}{{ eos_token }}
    {% endif %}
{% endfor %}
{%- if ns.system %}(system: {{ ns.system }}){% endif %}
{%- if add_generation_prompt %}[assistant]{% endif %}"""


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_rendering_equals_transformers(tmp_path: Path, kind: str) -> None:
    TOKENIZERS[kind](tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    template = ChatTemplate.load(tmp_path)
    assert template is not None
    tokenizer = load_tokenizer(tmp_path)
    for messages in CONVERSATIONS:
        if kind == "llama-2":  # its template drops system messages and alternates user/assistant
            messages = [m for m in messages if m["role"] != "system"]
        want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert template.render(messages) == want
        ids = hf.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert tokenizer.encode(template.render(messages), add_bos=False) == list(ids)
    expected = {k: v for k, v in hf.special_tokens_map.items() if k in special_tokens(tmp_path)}
    assert special_tokens(tmp_path) == expected


def test_a_saved_template_file_and_named_templates(tmp_path: Path) -> None:
    """transformers' save_pretrained writes chat_template.jinja; it wins over the config's."""
    llama3_tokenizer(tmp_path / "src")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "src")
    hf.chat_template = RICH_TEMPLATE
    hf.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "chat_template.jinja").is_file()
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    template = ChatTemplate.load(tmp_path / "saved")
    assert template is not None
    for messages in CONVERSATIONS:
        want = reloaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert template.render(messages) == want
    with pytest.raises(ChatTemplateError, match="bad role"):
        template.render([{"role": "tool", "content": "x"}])

    # Several named templates in tokenizer_config.json: the one named default.
    config_path = tmp_path / "src" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ messages[0]['content'] }}!"},
    ]
    config_path.write_text(json.dumps(config))
    template = ChatTemplate.load(tmp_path / "src")
    assert template is not None and template.render(CONVERSATIONS[0]) == "Hi there, café 😀!"
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ChatTemplateError, match="none named 'default'"):
        ChatTemplate.load(tmp_path / "src")
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    assert ChatTemplate.load(tmp_path / "src") is None


def test_the_sandbox_holds() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")
    escape = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        escape.render([{"role": "user", "content": "x"}])
