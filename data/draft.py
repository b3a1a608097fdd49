"""A free guess of what a forecast writes next, from the series' own history: the draft that
speculative decoding checks (qwen_min/speculative.py). A wrong guess costs only a little
arithmetic and never changes the output, so the guess only needs to be right often.

LLMTIME text repeats one shape, "2.73,1.99;2.81,1.94;...", so much of what comes next follows
from what came before:
- a value ends when it has as many decimals as the same species' value one step earlier, and a
  separator follows (',' after the prey, ';' after the predator);
- a new value's integer part is usually the same species' previous one (populations change little
  in one step), and its '.' follows;
- its decimals are anyone's guess: we copy the previous value's, which is right less often.
The first two kinds are the `sure` part of the guess; forward passes check them in columns of their own.

Before all that, a forecast often repeats the series' own past: a predator-prey orbit is closed, and
a model that has recognised the cycle copies it from the prompt, value for value. So when the text's
last RECALL characters occurred earlier, the guess is what followed them there, all of it sure
(prompt lookup decoding, Saxena 2023). On bench/forecast.py's 20 base-model forecasts this took the
forward passes after the prefill from 119 to 78.
"""

TAIL = 64  # characters of history the format guess looks at (two steps of even four-digit values fit)
RECALL = 10  # characters that must match an earlier place for the guess to copy what followed it


def guess(text, n=8):
    """text: LLMTIME so far (prompt and forecast) -> (the next n characters guessed, how many of them
    from the start are sure). ('', 0) when the text neither repeats nor ends in two well-formed steps."""
    copied = recall(text, n)
    return (copied, len(copied)) if copied else follow_format(text, n)


def recall(text, n):
    """What followed the latest earlier occurrence of text's last RECALL characters (n at most), or ''."""
    key = text[-RECALL:]
    at = text.rfind(key, 0, len(text) - 1)  # a match ending before the last character has a continuation
    return text[at + RECALL:at + RECALL + n] if len(text) >= RECALL and at >= 0 else ""


def follow_format(text, n):
    """The guess from the shape of the last two steps alone (the three kinds above)."""
    steps = text[-TAIL:].split(";")
    if len(steps) < 3:  # need one whole step before the current one (the first piece may be cut)
        return "", 0
    prev, cur = steps[-2].split(","), steps[-1]
    out, sure = "", None
    while len(out) < n:
        fields = cur.split(",")
        if len(prev) != 2 or len(fields) > 2:
            break
        value, (whole, _, decimals) = fields[-1], prev[len(fields) - 1].partition(".")
        if "." in value:
            done = len(value.partition(".")[2])
            if done >= len(decimals):
                c, certain = ("," if len(fields) == 1 else ";"), True  # the value is complete
            else:
                c, certain = decimals[done], False  # the previous value's digit: a weak guess
        elif whole.startswith(value) and value != whole:
            c, certain = whole[len(value)], True  # the previous integer part, digit by digit
        else:
            c, certain = ".", True
        if not certain and sure is None:
            sure = len(out)
        out += c
        cur += c
        if c == ";":
            prev, cur = cur[:-1].split(","), ""
    return out, len(out) if sure is None else sure


class LLMTimeDraft:
    """guess() on token ids: draft(tokens) -> (guessed ids, sure), for speculative.generate_drafted.
    id_of maps each LLMTIME character to its token id (one token per character, as Qwen2.5 reads
    digits); any other token in the history ends the text the guess reads."""

    def __init__(self, id_of, n=8):
        self.id_of, self.char_of, self.n = dict(id_of), {i: c for c, i in id_of.items()}, n

    def __call__(self, tokens):
        chars = []
        for t in reversed(tokens):
            c = self.char_of.get(t)
            if c is None:
                break
            chars.append(c)
        chars, sure = guess("".join(reversed(chars)), self.n)
        return [self.id_of[c] for c in chars], sure
