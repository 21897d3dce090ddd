"""What a test may assert about greedy answers of the real SmolLM2 model, on any CPU.

Greedy decoding takes the token with the highest logit. Where the two highest are close, which one wins
depends on the arithmetic of the machine: the order in which AVX-512 and AVX2 code sum the same products.
The chat question "What is the capital of France?" is such a near-tie: measured here (SmolLM2-135M Q4_1),
our engine answers "The capital of France is Paris." by 0.05 with AVX-512 code and "L'Étoile, ..." by 0.44
with AVX2 code (``NUMBA_CPU_NAME=haswell``); llama.cpp answers "L'Étoile" by 0.09, and on an AVX2-only
EPYC by 0.35 (ours there: by 0.49). So a test asserts greedy text only

- up to llama.cpp's first near-tie, for the golden prompts (``golden_prefix``: the golden file's
  ``safe_prefix_len`` tokens, before the first top-2 gap below :data:`NEAR_TIE`), or
- for the conversations below, whose every asserted token leads by a wide margin, measured with
  llama.cpp (llama-cpp-python 0.3.36) and with our engine under AVX-512 and AVX2 code, and measured again
  by ``test_model.py::test_stable_answers_*`` on every run.

Figures are the top-2 logit gaps of the answer's tokens, the last one the end of the turn where ``ends``.
"""

from __future__ import annotations

from dataclasses import dataclass

NEAR_TIE = 0.5  # the golden file's safe prefixes end before the first top-2 gap below this
WIDE = 1.0  # the least gap an asserted token may have; the answers below measured >= 1.36 everywhere


def golden_prefix(case: dict) -> tuple[list[int], str]:
    """llama.cpp's greedy tokens before its first near-tie, and their text."""
    n = case["safe_prefix_len"]
    assert all(m >= NEAR_TIE for m in case["top2_margins"][:n]), case["prompt"]
    return case["greedy_ids"][:n], case["safe_prefix_text"]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@dataclass(frozen=True)
class StableAnswer:
    """A conversation whose greedy answer starts with ``answer`` on every CPU (and then ends, if ``ends``)."""

    messages: tuple[dict[str, str], ...]
    answer: str
    ends: bool


QUESTION = "Complete the sentence: The capital of France is"
ANSWER = "The capital of France is Paris."
FOLLOW_UP = "And the capital of Italy?"

# llama.cpp 2.46 4.84 5.43 3.46 3.82 5.18 1.97 2.77; ours AVX-512 2.30 .. 2.01, AVX2 2.42 .. 2.03
CHAT = StableAnswer((user(QUESTION),), ANSWER, ends=True)
# "The capital of Italy is Rome." + end: llama.cpp >= 3.70, ours >= 3.52 on both
SECOND_TURN = StableAnswer(
    (user(QUESTION), assistant(ANSWER), user(FOLLOW_UP)), "The capital of Italy is Rome.", ends=True
)
# with a system prompt: llama.cpp 2.70 4.05 5.54 3.57 4.14 5.33 2.38 (the end of the turn only 0.94)
BRIEFLY = StableAnswer(({"role": "system", "content": "Answer briefly."}, user(QUESTION)), ANSWER, ends=False)
# typed over two lines: llama.cpp 3.06 5.00 4.21 3.33 3.71 4.31 2.11, ours >= 2.05 on both
TWO_LINES = StableAnswer((user("Complete the sentence: The capital \nof France is"),), ANSWER, ends=False)

# A long answer whose first 40 tokens are the same everywhere ("1, 2, 3, ..., 12, 1"): gaps >= 1.40
# (the first token; ours 1.40 / 1.53, llama.cpp 1.44), then >= 1.5.
COUNTING = "List the numbers from 1 to 100, separated by commas."
COUNTING_ANSWER = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12"


def after_interrupted_counting() -> list[StableAnswer]:
    """QUESTION asked after the counting answer was cut after its 4th to 14th token: the answer still
    says Paris (gaps >= 1.36 on the first token, >= 1.9 after, in llama.cpp and ours on both)."""
    cuts = ["1, 2", "1, 2,", "1, 2, ", "1, 2, 3", "1, 2, 3,", "1, 2, 3, ", "1, 2, 3, 4", "1, 2, 3, 4,",
            "1, 2, 3, 4, ", "1, 2, 3, 4, 5", "1, 2, 3, 4, 5,"]
    return [StableAnswer((user(COUNTING), assistant(cut), user(QUESTION)), "The capital of France is Paris",
                         ends=False) for cut in cuts]


def all_stable() -> list[StableAnswer]:
    """Every conversation the tests rely on, for ``test_model.py`` to measure."""
    counting = StableAnswer((user(COUNTING),), COUNTING_ANSWER, ends=False)
    return [CHAT, SECOND_TURN, BRIEFLY, TWO_LINES, counting, *after_interrupted_counting()]
