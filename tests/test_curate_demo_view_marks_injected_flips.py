"""The curated view `fastinf demo` prints after its NDR table: one line per suspect in rank order, the
injected flips marked with the label they had, the count against chance, and the lowest-ranked suspects
that kept the dataset's own label (candidate real mislabels) listed with the model's disagreement; the
run's recommended (group, method, how) is used when the run has one."""
from __future__ import annotations

from fastinf.curation.run_suspects import Suspect, _choice, format_suspects


def _suspects() -> tuple[list[Suspect], dict]:
    s = [Suspect(rank=1, id=7, text="free   prize\nnow", label="spam", original="ham", injected=True, predicted="ham"),
         Suspect(rank=2, id=3, text="see you at 5", label="ham", original="ham", injected=False, predicted="ham"),
         Suspect(rank=3, id=9, text="x" * 200, label="spam", original="ham", injected=True, predicted="ham")]
    unflipped = [s[1], Suspect(rank=8, id=4, text="WIN cash", label="ham", original="ham", injected=False,
                               predicted="spam")]
    return s, {"group": "q2", "method": "datainf", "how": "vote", "n_train": 400, "n_reference": 160,
               "noise_rate": 0.2, "injected": 2, "unflipped": unflipped}


def test_view_lists_suspects_marks_flips_and_candidate_real_mislabels() -> None:
    suspects, summary = _suspects()
    text = format_suspects(suspects, summary, width=40)
    lines = text.splitlines()
    assert "3 most detrimental of 400" in lines[0] and "q2 layers, datainf, vote" in lines[0]
    body = lines[2:5]
    assert [int(line.split()[0]) for line in body] == [1, 2, 3]
    assert "yes (was ham)" in body[0] and "free prize now" in body[0]          # one line, whitespace folded
    assert " no " in body[1] and "yes" not in body[1]
    assert body[2].endswith("…") and len(body[2].split("ham", 2)[-1]) < 60     # long texts cut
    assert "2 of 3 are injected flips" in text and "1 would be chance" in text
    tail = text.split("keep the dataset's own label", 1)[1]
    assert "WIN cash  <- model disagrees" in tail and "see you at 5" in tail
    assert "see you at 5  <- model disagrees" not in tail


def test_the_recommended_group_method_and_how_are_used() -> None:
    rec = {"recommendation": {"recommended": {"group": "q4", "method": "gradcos", "how": "vote"}}}
    assert _choice(rec) == ("q4", "gradcos", "vote")
    assert _choice({}) == ("all", "graddot", "rank")
    assert _choice({"recommendation": None}) == ("all", "graddot", "rank")
