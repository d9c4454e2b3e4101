"""A stand-in for the document before a stored one.

In a full prefill, a document that follows another one is computed after it; encoded after the
prompt's head alone, its K/V behave as if it opened the prompt. Encoding it after the head, a
neutral stand-in document and the separator brings its K/V much closer to the full prefill's,
whatever document actually precedes it (bench/NOTES.md, issue 18). The stand-in's own K/V are
not kept, and the default states no facts a reply could pick up. A document of the caller's own
collection (not one stored after itself) can stand in instead: the nearer it is to the prompt's
documents, the nearer their K/V come to the full prefill's (bench/NOTES.md, session 13)."""

from __future__ import annotations

from typing import Sequence

from ..errors import ConfigError
from ..tokenizer import check_text

_NOTE = (
    "This is a general reference note kept together with other documents in a shared "
    "collection. It describes, in plain and ordinary language, how a typical written record is "
    "organised, so that readers know what to expect before they look at any particular page. A "
    "record usually opens with a short statement of its purpose and of the people or places it "
    "concerns. It then gives the main facts in the order in which they are most often needed: "
    "first what something is, then where it is found, when it began, who is responsible for it, "
    "and how it is maintained. Numbers are written with their units, dates are given in full, and "
    "names are spelled as they appear in official sources. Where a rule applies, the record "
    "states the rule, the cases it covers, and the exceptions that have been agreed. Where a "
    "process is described, each step is listed with the person who carries it out and the time "
    "it normally takes. Records are reviewed from time to time, and older versions are kept so "
    "that changes can be traced. When two records seem to disagree, the more recent one is "
    "usually correct, and readers are encouraged to check the date on each page."
)
# The note twice: about as long as a stored document; a stand-in of one note measured further
# from the full prefill than two (bench/NOTES.md).
STAND_IN = " ".join([_NOTE] * 2)


def after_stand_in(tokenizer, context: Sequence[int], separator: Sequence[int],
                   text: str = STAND_IN) -> tuple[int, ...]:
    """The context for a document placed after another one: context (the prompt's head), the
    stand-in document `text` as plain text (control-token text stays literal), then the
    separator the prompt puts between documents."""
    if not check_text(text, "the stand-in text").strip():
        raise ConfigError("the stand-in text is empty; give a document's text, or leave text "
                          "unset for the default stand-in.")
    ids = tokenizer.encode(text, add_special_tokens=False, parse_special=False)
    return (*context, *ids, *separator)
