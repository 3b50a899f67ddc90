"""Versioned judge prompt templates, shipped as package data (YAML files beside this one)."""

from pathlib import Path

PROMPTS_DIR = Path(__file__).parent
