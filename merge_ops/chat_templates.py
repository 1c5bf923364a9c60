"""The recipe's ``chat_template``: ``auto``, a built-in prompt format by name, or a Jinja template.

The built-in formats render the prompts mergekit 0.1.5's templates of the same names render under
transformers' ``apply_chat_template`` (trim_blocks and lstrip_blocks), whitespace included: the indentation
mergekit's EXAONE file writes into every turn, Alpaca's system line and blank-line separators, the newline
after each Llama 3 turn. ``auto`` picks the template most of the recipe's models carry, as mergekit does.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`` per message."""

LLAMA3 = r"""{%- for message in messages -%}
{{- (bos_token if loop.first else '') + '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"""
"""BOS once, then ``<|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>\\n`` per message (content trimmed)."""

MISTRAL = r"""{%- set has_system = messages[0]['role'] == 'system' -%}
{%- set turns = messages[1:] if has_system else messages -%}
{{- bos_token -}}
{%- for message in turns -%}
{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}
{{- raise_exception('Mistral prompts take an optional system message, then user and assistant turns in alternation; got ' + message['role'] + ' at turn ' + loop.index|string) -}}
{%- elif message['role'] == 'assistant' -%}
{{- ' ' + message['content'] + eos_token -}}
{%- elif loop.first and has_system -%}
{{- ' [INST] ' + messages[0]['content'] + '\n\n' + message['content'] + ' [/INST]' -}}
{%- else -%}
{{- ' [INST] ' + message['content'] + ' [/INST]' -}}
{%- endif -%}
{%- endfor -%}"""
"""BOS, `` [INST] USER [/INST]`` and `` ASSISTANT</s>`` turns; a system message opens the first user turn."""

ALPACA = r"""{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}
{%- set headers = {'user': '### Instruction:\n', 'user_context': '### Input:\n', 'assistant': '### Response:\n'} -%}
{{- ((systems | last).content | trim if systems else '') + '\n\n' -}}
{%- for message in messages -%}
{%- if message['role'] in headers -%}
{{- headers[message['role']] + message['content'] | trim + ('' if loop.last else '\n\n') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{- '### Response:\n' -}}{%- endif -%}"""
"""The last system message, then ``### Instruction:`` / ``### Input:`` (role ``user_context``) / ``### Response:``
sections separated by blank lines; other roles are left out."""

EXAONE = r"""{%- for message in messages -%}
{%- if loop.first and message['role'] != 'system' -%}{{- '        [|system|][|endofturn|]\n\n' -}}{%- endif -%}
{{- '    [|' + message['role'] + '|]' + message['content'] + '\n' -}}
{{- '        \n\n' if message['role'] == 'user' else '        [|endofturn|]\n\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '    [|assistant|]\n' -}}{%- endif -%}"""
"""``[|ROLE|]CONTENT`` turns, non-user ones closed by ``[|endofturn|]``, an empty system turn when there is none
(with the indentation mergekit's file renders)."""

BUILT_IN = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "alpaca": ALPACA, "exaone": EXAONE}
"""The prompt formats a recipe names (mergekit's built-in names)."""

AUTO = "auto"


def check_chat_template(value: str) -> str:
    """A recipe's ``chat_template`` as given, when it is ``auto``, a built-in name or Jinja text.

    Raises:
        ValueError: any other text (a misspelt or unknown name), which would otherwise end up as the template.

    Example:
        >>> check_chat_template("chatml")
        'chatml'
    """
    if value == AUTO or value in BUILT_IN or "{{" in value or "{%" in value:
        return value
    raise ValueError(
        f"not a chat template: use {AUTO} (the template most of the models share), one of {', '.join(BUILT_IN)}, or a Jinja template"
    )


def model_chat_template(folder: Path) -> str | None:
    """The default chat template a model folder's tokenizer carries, as transformers loads it.

    ``chat_template.jinja`` wins over ``tokenizer_config.json``'s ``chat_template`` (text, or a list of named
    templates whose ``default`` is taken); None when there is none.
    """
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def resolve_chat_template(choice: str | None, folders: Iterable[Path]) -> str | None:
    """The template text to write for the recipe's ``chat_template``; None writes none (the tokenizer source's stays).

    Args:
        choice: the recipe's value (checked by ``check_chat_template``).
        folders: the recipe's model folders, base first, in recipe order.

    ``auto`` takes the template most models carry (compared without surrounding whitespace; a tie goes to the
    model listed first), or None when no model has one.

    Example:
        >>> resolve_chat_template("llama3", []) == LLAMA3
        True
    """
    if choice != AUTO:
        return BUILT_IN.get(choice, choice) if choice else None
    found = [template.strip() for template in map(model_chat_template, folders) if template and template.strip()]
    return Counter(found).most_common(1)[0][0] if found else None
