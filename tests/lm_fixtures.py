"""Kept for importers outside tests/lm that still use this path (tests/test_cli.py,
tests/test_pipelines.py): the builders live in tests/lm/fixtures.py."""

from tests.lm.fixtures import CHAT_TEMPLATE, HARVARD, tiny_causal_lm, tiny_tokenizer

__all__ = ["CHAT_TEMPLATE", "HARVARD", "tiny_causal_lm", "tiny_tokenizer"]
