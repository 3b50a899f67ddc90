"""Versioned judge prompt templates and their renderer.

A *prompt template* tells the MLLM judge how to decide whether a (query, target) pair is a true match.
One YAML file per task family ships in ``judge_prompts/`` (classification, vqa, retrieval, grounding,
visdoc, text); a user may also point at a YAML file of their own. Each file has exactly these keys:

``name``         the family (or any name, for a user's file)
``version``      an int >= 1
``instruction``  the judgment instruction, e.g. "Determine whether the given target matches the query."
``template``     the message text, with each of ``{instruction}``, ``{query}`` and ``{target}`` once,
                 ``{query}`` before ``{target}``, and no other placeholder (write ``{{``/``}}`` for braces)
``subsets``      a mapping subset name -> instruction override (may be ``{}``)
``labels``       optional, two distinct non-empty strings, the positive verdict first (default yes/no)

Versioning rule: judgments are cached by the prompt id ``<name>@v<version>``. Changing *any* text of a
template (instruction, template, overrides, labels) therefore means bumping its version; otherwise the
cache keeps serving verdicts that were given to the old wording.

Rendering (:func:`render`) produces the content parts of ONE user chat message, in the form that
transformers chat templates take: ``[{"type": "text", "text": ...}, {"type": "image"}, ...]``. Each side
(query, target) renders as its image part (when the row has an image) followed by its text. Candidate
text is untrusted: it is cut to ``max_chars`` characters and fenced as ``<<<text>>>``, with any ``<<<``
or ``>>>`` inside it broken up so that the candidate cannot close the fence and add instructions of its
own. :func:`images_of` gives the row images in the order their image parts appear.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from assay.judge_prompts import PROMPTS_DIR

FAMILIES = ("classification", "vqa", "retrieval", "grounding", "visdoc", "text")
PLACEHOLDERS = ("instruction", "query", "target")
REQUIRED_KEYS = frozenset({"name", "version", "instruction", "template", "subsets"})
OPTIONAL_KEYS = frozenset({"labels"})
DEFAULT_LABELS = ("yes", "no")


class PromptError(ValueError):
    """A prompt template file or value that cannot be used."""


def _placeholders(template: str) -> list[str]:
    """The placeholder names of ``template`` in order; PromptError for anything but the three, once each."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise PromptError(
            f"template has unbalanced braces ({e}); write {{{{ or }}}} for a literal brace"
        ) from e
    names = []
    for name, spec, conv in fields:
        if name not in PLACEHOLDERS or spec or conv:
            shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            raise PromptError(
                f"template has placeholder {shown}; only {{instruction}}, {{query}}, {{target}}"
            )
        names.append(name)
    for name in PLACEHOLDERS:
        if names.count(name) != 1:
            raise PromptError(f"template must contain {{{name}}} exactly once (found {names.count(name)})")
    if names.index("query") > names.index("target"):
        raise PromptError("template must place {query} before {target}")
    return names


@dataclass(frozen=True)
class PromptTemplate:
    """One versioned judge prompt; constructing it checks every field (PromptError)."""

    name: str
    version: int
    instruction: str
    template: str
    subsets: dict[str, str] = field(default_factory=dict)
    labels: tuple[str, str] = DEFAULT_LABELS

    def __post_init__(self) -> None:
        for key in ("name", "instruction", "template"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise PromptError(f"{key} must be a non-empty string, got {getattr(self, key)!r}")
        if type(self.version) is not int or self.version < 1:
            raise PromptError(f"version must be an int >= 1, got {self.version!r}")
        if not isinstance(self.subsets, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in self.subsets.items()
        ):
            raise PromptError(
                f"subsets must map subset names to non-empty instructions, got {self.subsets!r}"
            )
        labels = self.labels
        if (
            not isinstance(labels, list | tuple)
            or len(labels) != 2
            or not all(isinstance(x, str) and x.strip() for x in labels)
            or labels[0] == labels[1]
        ):
            raise PromptError(f"labels must be two distinct non-empty strings, got {labels!r}")
        object.__setattr__(self, "labels", tuple(labels))
        _placeholders(self.template)

    @property
    def id(self) -> str:
        """The cache key of judgments made with this prompt."""
        return f"{self.name}@v{self.version}"

    def instruction_for(self, subset: str | None) -> str:
        """The subset's instruction override when it has one, else the family instruction."""
        return self.subsets.get(subset, self.instruction) if subset is not None else self.instruction


def load_prompt(name_or_path: str | Path) -> PromptTemplate:
    """Load a shipped family by name (``"vqa"``) or a user's YAML file by path; PromptError if unusable."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text:
        path, family = Path(name_or_path), None
    elif text in FAMILIES:
        path, family = PROMPTS_DIR / f"{text}.yaml", text
    else:
        raise PromptError(
            f"unknown judge prompt family {text!r}; known: {', '.join(FAMILIES)} (or a YAML path)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"{path}: cannot read prompt file: {e}") from e
    except yaml.YAMLError as e:
        raise PromptError(f"{path}: not a valid (safe) YAML prompt file: {e}") from e
    if not isinstance(data, dict):
        raise PromptError(f"{path}: expected a mapping of prompt keys, got {type(data).__name__}")
    keys = set(data)
    if unknown := keys - REQUIRED_KEYS - OPTIONAL_KEYS:
        raise PromptError(f"{path}: unknown keys {sorted(map(str, unknown))}")
    if missing := REQUIRED_KEYS - keys:
        raise PromptError(f"{path}: missing keys {sorted(missing)}")
    try:
        prompt = PromptTemplate(**{"labels": DEFAULT_LABELS, **data})
    except PromptError as e:
        raise PromptError(f"{path}: {e}") from None
    if family is not None and prompt.name != family:
        raise PromptError(f"{path}: name is {prompt.name!r}, expected {family!r}")
    return prompt


def family_for_task(task: str | None) -> str:
    """The judge prompt family for a dataset task: the task itself when it is a family, else retrieval."""
    return task if task in FAMILIES else "retrieval"


def _fence(text: str, max_chars: int) -> str:
    """Cut untrusted text to ``max_chars`` and fence it so that it cannot close the fence itself."""
    if len(text) > max_chars:
        text = text[:max_chars] + "…"
    while "<<<" in text or ">>>" in text:
        text = text.replace("<<<", "<< <").replace(">>>", ">> >")
    # A leading "<" or trailing ">" would run into the fence ("<<<<", ">>>>"); keep the fence exact.
    text = (" " if text.startswith("<") else "") + text + (" " if text.endswith(">") else "")
    return "<<<" + text + ">>>"


def _side(row: dict[str, Any], max_chars: int) -> list[dict[str, str]]:
    has_image, text = row.get("image") is not None, row.get("text")
    parts = [{"type": "image"}] if has_image else []
    if text or not has_image:
        parts.append({"type": "text", "text": _fence(text or "", max_chars)})
    return parts


def render(
    template: PromptTemplate, query_row: dict[str, Any], doc_row: dict[str, Any], *, max_chars: int = 2000
) -> list[dict[str, str]]:
    """The content parts of one user message judging ``doc_row`` as a target for ``query_row``."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    values = {
        "instruction": [{"type": "text", "text": template.instruction_for(query_row.get("subset"))}],
        "query": _side(query_row, max_chars),
        "target": _side(doc_row, max_chars),
    }
    parts: list[dict[str, str]] = []
    for literal, name, _, _ in string.Formatter().parse(template.template):
        for part in [{"type": "text", "text": literal}] + (values[name] if name is not None else []):
            if part["type"] == "text" and not part["text"]:
                continue
            if part["type"] == "text" and parts and parts[-1]["type"] == "text":
                parts[-1] = {"type": "text", "text": parts[-1]["text"] + part["text"]}
            else:
                parts.append(part)
    return parts


def render_text(parts: list[dict[str, str]], image_token: str) -> str:
    """Join content parts into one string, writing ``image_token`` for each image part."""
    return "".join(image_token if p["type"] == "image" else p["text"] for p in parts)


def images_of(query_row: dict[str, Any], doc_row: dict[str, Any]) -> list[Any]:
    """The rows' images in the order :func:`render` places their image parts (query first)."""
    return [row["image"] for row in (query_row, doc_row) if row.get("image") is not None]
