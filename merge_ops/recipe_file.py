"""Reading a recipe: YAML -> a validated ``Recipe``, checked against the schema and then against its method.

``load_recipe`` accepts any mergekit recipe unchanged and raises one RecipeError that lists every problem
with its key path, the bad value and what is allowed. The file is read with bounds: at most ``MAX_RECIPE_BYTES``
of UTF-8 text whose YAML, aliases expanded, holds at most ``MAX_YAML_NODES`` nodes (a "billion laughs" document is
refused before it is built).
"""
from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from merge_ops.errors import RecipeError
from merge_ops.recipe import Recipe, validation_problems
from merge_ops.recipe_checks import method_problems

MAX_RECIPE_BYTES = 1 << 20
"""Largest recipe file read (1 MiB); real recipes are a few KB."""
MAX_YAML_NODES = 100_000
"""Most YAML nodes a recipe may hold once its aliases are expanded."""
MAX_YAML_DEPTH = 64
"""Deepest YAML nesting read (recipes nest a handful of levels; PyYAML composes recursively)."""


class _YamlTooLarge(yaml.YAMLError):
    """A document too deep, expanding past ``MAX_YAML_NODES`` or referring to itself; its message is the recipe problem."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expanded_size(root: yaml.Node, limit: int) -> None:
    """Count the nodes of ``root`` with every alias expanded (each shared node counted once per use, computed once).

    Raises:
        _YamlTooLarge: more than ``limit`` nodes, or an alias inside the node it names.
    """
    sizes: dict[int, int] = {}
    ancestors: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            ancestors.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[id(node)] > limit:
                raise _YamlTooLarge(f"its YAML aliases expand to more than {limit} values (a \"billion laughs\" document?); write the recipe out "
                                    "without nested aliases")
        elif id(node) in ancestors:
            raise _YamlTooLarge("a YAML alias is used inside the value it names (a recursive document); write the recipe without it")
        elif id(node) not in sizes:
            ancestors.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that bounds the nesting while composing and checks the composed document's expanded size
    before building any Python value."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _YamlTooLarge(f"its YAML nests more than {MAX_YAML_DEPTH} levels deep; write the recipe with fewer nested levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            _check_expanded_size(node, MAX_YAML_NODES)
        return node


def read_recipe_text(path: Path) -> str:
    """The text of a recipe file: a regular file of at most ``MAX_RECIPE_BYTES`` of UTF-8 (newlines as ``read_text``).

    Raises:
        RecipeError: missing, a directory or other non-file, too large, unreadable, or not UTF-8 text.

    Example:
        >>> read_recipe_text(Path("recipes/ties.yaml")).startswith("merge_method")
        True
    """
    def refuse(problem: str) -> RecipeError:
        return RecipeError([problem], source=str(path))

    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise refuse("is a directory, not a recipe file; pass the recipe's YAML file")
        if not stat.S_ISREG(info.st_mode):
            raise refuse("is not a regular file; pass the recipe's YAML file")
        if info.st_size > MAX_RECIPE_BYTES:
            raise refuse(f"the file is {info.st_size} bytes, over the {MAX_RECIPE_BYTES}-byte limit for recipes; is this the recipe's YAML file?")
        with path.open(encoding="utf-8", errors="strict") as file:  # text mode: newlines read as read_text() reads them
            text = file.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise refuse(f"file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise refuse(f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); is it a binary file? pass the recipe's YAML file") from None
    except OSError as err:
        raise refuse(f"cannot read the file ({err.strerror or type(err).__name__}); check the path and its permissions") from None
    if len(text) > MAX_RECIPE_BYTES:
        raise refuse(f"the file is over the {MAX_RECIPE_BYTES}-byte limit for recipes; is this the recipe's YAML file?")
    return text


def parse_recipe_yaml(text: str, *, source: str = "recipe") -> Any:
    """Recipe YAML parsed safely, nested at most ``MAX_YAML_DEPTH`` levels and at most ``MAX_YAML_NODES`` values with its
    aliases expanded (checked before any Python value is built).

    Raises:
        RecipeError: not valid YAML, nested too deeply, or a YAML bomb (aliases expanding past the limit, or recursive).

    Example:
        >>> parse_recipe_yaml("merge_method: ties")
        {'merge_method': 'ties'}
    """
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506  # a SafeLoader subclass
    except _YamlTooLarge as err:
        raise RecipeError([str(err)], source=source) from None
    except yaml.YAMLError as err:
        raise RecipeError([f"not valid YAML: {_yaml_problem(err)}; fix the YAML syntax there"], source=source) from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error as one line: what is wrong and where (line and column, 1-based)."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return " ".join(str(err).split())
    mark = err.problem_mark or err.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    what = " ".join(filter(None, (err.context, err.problem)))
    return f"{what}{where}"


def parse_recipe(data: Any, *, source: str = "recipe") -> Recipe:
    """Validate recipe data (parsed YAML); RecipeError lists every problem."""
    if not isinstance(data, dict):
        raise RecipeError([f"(top level): expected a mapping with merge_method and models/slices, got {type(data).__name__}"], source=source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems = validation_problems(err)
        bad_keys = {e["loc"][0] for e in err.errors() if e["loc"]}
        try:  # without the broken top-level keys, the rest can still be checked against the method
            problems += method_problems(Recipe.model_validate({k: v for k, v in data.items() if k not in bad_keys}))
        except ValidationError:
            pass
        raise RecipeError(problems, source=source) from None
    problems = method_problems(recipe)
    if problems:
        raise RecipeError(problems, source=source)
    return recipe


def load_recipe(path: Path) -> Recipe:
    """Read and validate a YAML recipe file (within the bounds of ``read_recipe_text`` and ``parse_recipe_yaml``).

    Raises:
        RecipeError: what those refuse, and every schema and method problem at once.
    """
    text = read_recipe_text(Path(path))
    return parse_recipe(parse_recipe_yaml(text, source=str(path)), source=str(path)).with_source(text, Path(path).absolute())
