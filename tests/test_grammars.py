"""``lmi_core.grammars``: a constraint's grammar, or the message that says why it has none."""

from __future__ import annotations

import pytest

from lmi_core.engine import StructuredOutput
from lmi_core.grammars import grammar_error


@pytest.mark.parametrize("grammar", ['root ::= "a" | "b"', 'start: "a" | "b"'])
def test_gbnf_and_lark_grammars_compile(grammar: str) -> None:
    assert grammar_error(StructuredOutput("grammar", grammar)) is None


@pytest.mark.parametrize("grammar", ["x", "root ::= [", "\u00a5\u00d2\u00fc"])
def test_text_that_is_neither_lark_nor_gbnf_is_an_error_message(grammar: str) -> None:
    """Before: llguidance's GbnfToLarkError escaped ``grammar_error``, a 500 on every route."""
    message = grammar_error(StructuredOutput("grammar", grammar))
    assert message is not None and message.startswith("not a GBNF grammar")
