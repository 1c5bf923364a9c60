"""Chat templates: the built-in prompt formats render mergekit's prompts, ``auto`` picks the most shared template,
an unknown name is refused, and the merged model's tokenizer applies the template with transformers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from merge_ops.chat_templates import BUILT_IN, model_chat_template, resolve_chat_template
from merge_ops.engine import merge_model
from merge_ops.errors import RecipeError
from merge_ops.plan import plan_merge
from merge_ops.recipe_file import parse_recipe


def message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


CONVERSATIONS = {  # name -> (messages, add_generation_prompt)
    "user": ([message("user", "Hi there")], True),
    "system": ([message("system", " Be brief. "), message("user", " What is 2+2? "), message("assistant", "4\n")], False),
    "turns": ([message("user", "a"), message("assistant", "b"), message("user", "c")], False),
    "context": ([message("user", "Summarise"), message("user_context", "text here"), message("assistant", "ok")], True),
    "two_systems": ([message("system", "S1"), message("system", "S2"), message("user", "u")], True),
}

EXPECTED = {
    # What mergekit 0.1.5's chat_templates/<name>.jinja render for CONVERSATIONS under transformers'
    # apply_chat_template, with bos_token <s> and eos_token </s> (None: the template refuses the conversation).
    # bench/chat_templates_vs_mergekit.py renders both tools' templates over more conversations.
    "chatml": {
        "user": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "system": "<|im_start|>system\n Be brief. <|im_end|>\n<|im_start|>user\n What is 2+2? <|im_end|>\n<|im_start|>assistant\n4\n<|im_end|>\n",
        "turns": "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n",
        "context": "<|im_start|>user\nSummarise<|im_end|>\n<|im_start|>user_context\ntext here<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
                   "<|im_start|>assistant\n",
        "two_systems": "<|im_start|>system\nS1<|im_end|>\n<|im_start|>system\nS2<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n",
    },
    "llama3": {
        "user": "<s><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\n",
        "system": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\n"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>\n",
        "turns": "<s><|start_header_id|>user<|end_header_id|>\n\na<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\nb<|eot_id|>\n"
                 "<|start_header_id|>user<|end_header_id|>\n\nc<|eot_id|>\n",
        "context": "<s><|start_header_id|>user<|end_header_id|>\n\nSummarise<|eot_id|>\n<|start_header_id|>user_context<|end_header_id|>\n\ntext here<|eot_id|>\n"
                   "<|start_header_id|>assistant<|end_header_id|>\n\nok<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\n",
        "two_systems": "<s><|start_header_id|>system<|end_header_id|>\n\nS1<|eot_id|>\n<|start_header_id|>system<|end_header_id|>\n\nS2<|eot_id|>\n"
                       "<|start_header_id|>user<|end_header_id|>\n\nu<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\n",
    },
    "mistral": {
        "user": "<s> [INST] Hi there [/INST]",
        "system": "<s> [INST]  Be brief. \n\n What is 2+2?  [/INST] 4\n</s>",
        "turns": "<s> [INST] a [/INST] b</s> [INST] c [/INST]",
        "context": None,
        "two_systems": None,
    },
    "alpaca": {
        "user": "\n\n### Instruction:\nHi there### Response:\n",
        "system": "Be brief.\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n4",
        "turns": "\n\n### Instruction:\na\n\n### Response:\nb\n\n### Instruction:\nc",
        "context": "\n\n### Instruction:\nSummarise\n\n### Input:\ntext here\n\n### Response:\nok",
        "two_systems": "S2\n\n### Instruction:\nu### Response:\n",
    },
    "exaone": {
        "user": "        [|system|][|endofturn|]\n\n    [|user|]Hi there\n        \n\n    [|assistant|]\n",
        "system": "    [|system|] Be brief. \n        [|endofturn|]\n\n    [|user|] What is 2+2? \n        \n\n    [|assistant|]4\n\n        [|endofturn|]\n\n",
        "turns": "        [|system|][|endofturn|]\n\n    [|user|]a\n        \n\n    [|assistant|]b\n        [|endofturn|]\n\n    [|user|]c\n        \n\n",
        "context": "        [|system|][|endofturn|]\n\n    [|user|]Summarise\n        \n\n    [|user_context|]text here\n        [|endofturn|]\n\n"
                   "    [|assistant|]ok\n        [|endofturn|]\n\n    [|assistant|]\n",
        "two_systems": "    [|system|]S1\n        [|endofturn|]\n\n    [|system|]S2\n        [|endofturn|]\n\n    [|user|]u\n        \n\n    [|assistant|]\n",
    },
}


def tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with <s> and </s>, enough for apply_chat_template."""
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", "Hi", "there"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=chat_template)


def with_tokenizer(model: Path, folder: Path, *, template: str | None = None, in_config: bool = False) -> Path:
    """A copy of ``model`` with a tokenizer whose chat template is ``template`` (in tokenizer_config.json when
    ``in_config``, else in chat_template.jinja as transformers saves it)."""
    shutil.copytree(model, folder)
    tokenizer(None if in_config else template).save_pretrained(folder)
    if in_config:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


def render(template: str, name: str) -> str:
    messages, generation_prompt = CONVERSATIONS[name]
    rendered = tokenizer(template).apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert isinstance(rendered, str)
    return rendered


@pytest.mark.parametrize("template", list(EXPECTED))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_built_in_templates_render_mergekits_prompts(template: str, conversation: str) -> None:
    expected = EXPECTED[template][conversation]
    if expected is None:
        with pytest.raises(Exception, match="alternation|roles"):
            render(BUILT_IN[template], conversation)
    else:
        assert render(BUILT_IN[template], conversation) == expected


def recipe(models: list[Path], **extra: object) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models], **extra}


@pytest.mark.parametrize("value", ["llama-3", "ChatML", "vicuna", "my template", "{ not jinja }"])
def test_an_unknown_template_name_is_refused_at_validation(family: dict[str, Path], value: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe([family["ft_a"]], chat_template=value))
    assert info.value.problems == [
        f"chat_template: {value!r} -> not a chat template: use auto (the template most of the models share), "
        "one of chatml, llama3, mistral, alpaca, exaone, or a Jinja template"
    ]


def test_a_built_in_name_is_written_as_its_template_and_the_merged_tokenizer_applies_it(family: dict[str, Path], tmp_path: Path) -> None:
    source = with_tokenizer(family["ft_a"], tmp_path / "a", template=BUILT_IN["chatml"], in_config=True)
    merge_model(plan_merge(parse_recipe(recipe([source], chat_template="llama3"))), tmp_path / "out")
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == BUILT_IN["llama3"]
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == BUILT_IN["chatml"]  # copied as is
    loaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    messages, generation_prompt = CONVERSATIONS["user"]
    rendered = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert rendered == EXPECTED["llama3"]["user"]
    ids = loaded.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False)
    assert ids == loaded(rendered, add_special_tokens=False)["input_ids"] and ids[0] == loaded.bos_token_id


def test_jinja_text_is_written_verbatim(family: dict[str, Path], tmp_path: Path) -> None:
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    source = with_tokenizer(family["ft_a"], tmp_path / "a")
    merge_model(plan_merge(parse_recipe(recipe([source], chat_template=template))), tmp_path / "out")
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == template
    loaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert loaded.apply_chat_template([message("user", "Hi")], tokenize=False) == "user: Hi\n"


def test_auto_takes_the_template_most_models_carry(family: dict[str, Path], tmp_path: Path) -> None:
    shared, other = BUILT_IN["chatml"], BUILT_IN["alpaca"]
    base = with_tokenizer(family["base"], tmp_path / "base", template=other)
    a = with_tokenizer(family["ft_a"], tmp_path / "a", template=shared + "\n")
    b = with_tokenizer(family["ft_b"], tmp_path / "b", template=shared, in_config=True)
    merge_model(plan_merge(parse_recipe({**recipe([a, b]), "merge_method": "task_arithmetic", "base_model": str(base),
                                         "chat_template": "auto"})), tmp_path / "out")
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == shared.strip()  # compared and written stripped, as mergekit does
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == shared.strip()


def test_auto_breaks_a_tie_by_recipe_order_and_writes_nothing_without_templates(family: dict[str, Path], tmp_path: Path) -> None:
    a = with_tokenizer(family["ft_a"], tmp_path / "a", template=BUILT_IN["mistral"])
    b = with_tokenizer(family["ft_b"], tmp_path / "b", template=BUILT_IN["exaone"])
    assert resolve_chat_template("auto", [b, a]) == BUILT_IN["exaone"].strip()
    assert resolve_chat_template("auto", [a, b, family["base"]]) == BUILT_IN["mistral"].strip()
    merge_model(plan_merge(parse_recipe(recipe([family["ft_a"], family["ft_b"]], chat_template="auto"))), tmp_path / "out")
    assert not (tmp_path / "out" / "chat_template.jinja").exists()


def test_a_models_template_is_read_as_transformers_reads_it(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert model_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert model_chat_template(tmp_path) == "J"  # the .jinja file wins over the config
    assert model_chat_template(tmp_path / "missing") is None
