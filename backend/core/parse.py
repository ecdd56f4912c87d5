"""The one reader of yes/no words, for environment knobs, model options, request metadata and job options alike."""

from __future__ import annotations

TRUE_WORDS = frozenset({"1", "true", "yes", "on", "enabled"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", "disabled"})


def parse_bool(value: str, *, empty: bool | None = None) -> bool:
    """`1/0`, `true/false`, `yes/no`, `on/off`, `enabled/disabled` in any case, blanks around ignored.

    `empty` is what a blank value means where the caller gives one a meaning (a bare option key is "on"); without
    it a blank is no boolean either.

    Raises:
        ValueError: anything else (the message lists the accepted words).
    """
    word = value.strip().lower()
    if not word and empty is not None:
        return empty
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise ValueError(f"not a boolean: {value!r} (use true/false, 1/0, yes/no or on/off)")
