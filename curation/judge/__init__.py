"""The MLLM-as-a-Judge (built in a later issue): prompts, scoring backends, verdict rules, cache."""

from curation.judge.prompts import (
    FAMILIES,
    PromptError,
    PromptTemplate,
    family_for_task,
    images_of,
    load_prompt,
    render,
    render_text,
)

__all__ = [
    "FAMILIES",
    "PromptError",
    "PromptTemplate",
    "family_for_task",
    "images_of",
    "load_prompt",
    "render",
    "render_text",
]
