"""The MLLM-as-a-Judge (built in a later issue): prompts, scoring backends, verdict rules, cache."""
