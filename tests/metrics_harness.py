"""Generated inputs shared by the metric tests: random answer texts built from the tokens that the reference
normalisations treat specially, and a readable report of where ours and a reference disagree."""

from __future__ import annotations

import random

from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

# Tokens the reference normalisations treat specially: every contraction of the EvalAI table (spelling and restored
# form), its quirky entries, articles, number words, numbers with punctuation, possessives, yes/no words, Unicode.
TOKENS = (
    *EvalAIAnswerProcessor.CONTRACTIONS,
    *EvalAIAnswerProcessor.CONTRACTIONS.values(),
    *"Im im i'm Ive ive id've I'dve somebody'd somebodyd she's let's 'ows'at ow's'at y'allll DONT twas hes".split(),
    *"a an the A The THE zero one Two three four five six seven eight nine ten None eleven".split(),
    *"3 1,000 3.5 .5 3. 10,5 1.000,5 2-3 4/5 1:30 12.30pm 100% $5 man's it's 's its o'clock e.g. U.S.A.".split(),
    *"yes no not No y n cat Red black white dog café İstanbul Straße Ω ٣ ﬁne ｙｅｓ".split(),
)
MARKS = (*";/[]\"{}()=+\\_-><@`,?!.':*&#~|", "...")
SPACES = (" ", " ", " ", "  ", "\t", "\n", "\r", "\u00a0", "\u3000", " \t ")


def random_text(rng: random.Random, tokens: tuple[str, ...] = TOKENS, max_tokens: int = 6) -> str:
    """Up to `max_tokens` tokens in random case, some with a mark glued on, between random whitespace or marks."""
    text = rng.choice(("", "", " ", "\t", "\n"))
    for _ in range(rng.randint(0, max_tokens)):
        token = rng.choice(tokens)
        token = rng.choice((token, token, token, token.upper(), token.capitalize()))
        if rng.random() < 0.2:
            token += rng.choice(MARKS)
        if rng.random() < 0.1:
            token = rng.choice(MARKS) + token
        text += token + (rng.choice(SPACES) if rng.random() < 0.85 else rng.choice(MARKS))
    return text


def generated_questions(seed: int, n: int) -> list[tuple[str, list[str]]]:
    """(prediction, 10 answers) pairs whose answers repeat, so that 0 to 10 of them match the prediction."""
    rng = random.Random(seed)
    questions = []
    for _ in range(n):
        pool = [random_text(rng, max_tokens=3) for _ in range(3)]
        answers = [rng.choice(pool) for _ in range(10)]
        prediction = rng.choice(pool)
        if rng.random() < 0.3:  # a variant that often normalises to the same answer
            prediction = rng.choice(("The ", "a ", " ", "")) + prediction.upper() + rng.choice((".", "!", " ", ""))
        questions.append((prediction, answers))
    return questions


def mutated(rng: random.Random, text: str, alphabet: str = "ab AB\t\n.-1ß") -> str:
    """`text` after up to 4 random insertions, deletions and substitutions."""
    chars = list(text)
    for _ in range(rng.randint(0, 4)):
        op, i = rng.random(), rng.randint(0, len(chars))
        if op < 0.4:
            chars.insert(i, rng.choice(alphabet))
        elif chars and op < 0.7:
            chars.pop(min(i, len(chars) - 1))
        elif chars:
            chars[min(i, len(chars) - 1)] = rng.choice(alphabet)
    return "".join(chars)


def generated_anls_questions(seed: int, n: int) -> list[tuple[str, list[str]]]:
    """(prediction, 1-3 answers), all edits of one short string: similarities around the 0.5 threshold are common."""
    rng = random.Random(seed)
    questions = []
    for _ in range(n):
        base = "".join(rng.choice("ab AB\t\n.-1ß") for _ in range(rng.randint(0, 8)))
        questions.append((mutated(rng, base), [mutated(rng, base) for _ in range(rng.randint(1, 3))]))
    return questions


def first_mismatches(pairs: list[tuple[object, object, object]], n: int = 5) -> list[tuple[object, object, object]]:
    """(input, ours, reference) of the first `n` pairs that disagree, for a readable assertion message."""
    return [p for p in pairs if p[1] != p[2]][:n]
