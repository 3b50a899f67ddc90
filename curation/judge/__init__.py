"""The MLLM-as-a-Judge: prompts, scoring backends, verdict rules, the judgment cache, the judge stage.

- ``prompts``: versioned templates (judge_prompts/) and the renderer (candidate text fenced and capped);
- ``scoring``: what every backend takes (``JudgeItem``) and gives (``Score``: logit(yes) - logit(no));
- ``hf`` (transformers, in process), ``vllm_backend`` (vLLM engines), ``openai_backend`` (an
  OpenAI-compatible endpoint): the backends, imported on use (they pull torch, vllm);
- ``verdicts``: the paper's rule, UniME-V2's, a threshold;
- ``cache``: judgments keyed by (judge model and weights, prompt version, query id, doc id);
- ``stage``: ``judge_dataset``, the stage that writes verdicts into a new dataset;
- ``robustness``: gold agreement and the injection flip rate of a judge;
- ``quality``: a judge run's verdicts measured against a truth (AUC of p_yes, false-negative
  precision and recall, agreement with gold).
"""

from assay.curation.judge.prompts import (
    FAMILIES,
    PromptError,
    PromptTemplate,
    family_for_task,
    images_of,
    load_prompt,
    render,
    render_text,
)
from assay.curation.judge.scoring import JudgeItem, Score, Scorer
from assay.curation.judge.verdicts import VerdictRule, parse_rule

__all__ = [
    "FAMILIES",
    "JudgeItem",
    "PromptError",
    "PromptTemplate",
    "Score",
    "Scorer",
    "VerdictRule",
    "family_for_task",
    "images_of",
    "load_prompt",
    "parse_rule",
    "render",
    "render_text",
]
