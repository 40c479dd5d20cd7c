"""Prompts of the text-knowledge methods: KAR factorisation prompting and R4ec reflect-and-refine.

KAR (Xi et al., 2023) asks the LM two kinds of question over the same *scenario factors*:

* **user preference reasoning** — from the user's profile and LM history (titles with
  ratings), what does the user like and dislike along each factor;
* **item facts** — what the item is along the same factors.

R4ec adds a **reflector** pass (critique the reasoning against the user's actual ratings: which
claims the ratings contradict) and an **actor** pass (rewrite the reasoning using the critique).

The prompts are written for SmolLM2-135M-Instruct: short, direct, one task each, and an explicit
length ("in 3 sentences") because a small model otherwise rambles until ``max_new_tokens``.
A user prompt with 30 history items is ~450 SmolLM2 tokens.

Every template has a version in :data:`TEMPLATE_VERSIONS`; it is part of the cache key of the
generated text, so editing a template (and bumping its version) never reuses stale text.

Example:
    >>> p = user_prompt({"gender": "female", "age": "25-34"}, [("Heat", 1995, 5), ("Babe", 1995, 2)])
    >>> "Heat (1995): 5" in p and "genres" in p
    True
    >>> "director" in item_prompt({"title": "Heat", "year": 1995, "tags": ["Action"]})
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "FACTORS",
    "SYSTEM",
    "TEMPLATE_VERSIONS",
    "history_line",
    "item_prompt",
    "profile_phrase",
    "reflect_prompt",
    "refine_prompt",
    "user_history_part",
    "user_prompt",
    "user_encoder_text",
]

#: The scenario factors of the movie domain (KAR's factorisation).
FACTORS: tuple[str, ...] = ("genre", "director/actors", "era/country", "plot/theme", "mood", "critical acclaim")

#: System message of every generation (part of each cache key through the template versions).
SYSTEM = "You are a movie expert. Answer briefly and concretely."

#: Version of each template. Bump one when its wording changes: the cache key changes with it.
TEMPLATE_VERSIONS: dict[str, str] = {
    "user": "kar-user-v1",
    "item": "kar-item-v1",
    "reflect": "r4ec-reflect-v1",
    "refine": "r4ec-refine-v1",
}

# How each factor is asked about, in the user and the item prompts (same order as FACTORS).
_USER_FACTORS = "genres, directors or actors, era and country, plots and themes, mood, and critical acclaim"
_ITEM_FACTORS = "genre, director and main actors, era and country, plot and theme, mood, and critical acclaim"


def profile_phrase(profile: Mapping[str, str]) -> str:
    """``{"gender": "male", "age": "18-24", "occupation": "student"}`` -> ``"male, age 18-24, student"``.

    Unknown or empty values are left out; other columns are shown as ``key value``.
    """
    parts: list[str] = []
    for k, v in profile.items():
        v = str(v).strip()
        if not v or v.lower() in ("unknown", "nan", "none"):
            continue
        if k == "age":
            parts.append(f"age {v}")
        elif k in ("gender", "occupation"):
            parts.append(v)
        else:
            parts.append(f"{k} {v}")
    return ", ".join(parts)


def _title(title: str, year: Any) -> str:
    return f"{title} ({int(year)})" if year not in (None, "") and year == year else str(title)


def history_line(history: Sequence[tuple[str, Any, int]], has_ratings: bool = True) -> str:
    """``[(title, year, rating)]`` -> ``"Heat (1995): 5; Babe (1995): 2"`` (oldest first).

    Label-only data (``has_ratings=False``) shows ``liked`` / ``disliked`` instead of the rating.
    """
    if has_ratings:
        return "; ".join(f"{_title(t, y)}: {int(r)}" for t, y, r in history)
    return "; ".join(f"{_title(t, y)}: {'liked' if r >= 4 else 'disliked'}" for t, y, r in history)


def user_history_part(profile: Mapping[str, str], history: Sequence[tuple[str, Any, int]],
                      has_ratings: bool = True, noun: str = "movie") -> str:
    """The part of the user prompt that states the facts (profile + rated history).

    KAR encodes the generated reasoning together with this part (see :func:`user_encoder_text`).
    """
    who = profile_phrase(profile)
    who = f"A user ({who})" if who else "A user"
    scale = "from 1 (bad) to 5 (great)" if has_ratings else "as liked or disliked"
    return f"{who} rated these {noun}s {scale}, oldest first:\n{history_line(history, has_ratings)}"


def user_prompt(profile: Mapping[str, str], history: Sequence[tuple[str, Any, int]], has_ratings: bool = True,
                noun: str = "movie") -> str:
    """KAR user preference reasoning over the scenario factors.

    Example:
        >>> print(user_prompt({"gender": "male"}, [("Heat", 1995, 4)]))  # doctest: +NORMALIZE_WHITESPACE
        A user (male) rated these movies from 1 (bad) to 5 (great), oldest first:
        Heat (1995): 4
        Describe this user's movie taste in 3 sentences: which genres, directors or actors, era and country, plots and themes, mood, and critical acclaim they like, and what they dislike.
    """
    return (f"{user_history_part(profile, history, has_ratings, noun)}\n"
            f"Describe this user's {noun} taste in 3 sentences: which {_USER_FACTORS} they like, "
            f"and what they dislike.")


def item_prompt(info: Mapping[str, Any], noun: str = "movie") -> str:
    """KAR item facts over the same factors (title, year and genres given as anchors).

    Example:
        >>> item_prompt({"title": "Heat", "year": 1995, "tags": ["Action", "Crime"]})
        'Describe the movie "Heat" (1995; Action, Crime) in 3 sentences: its genre, director and main actors, era and country, plot and theme, mood, and critical acclaim.'
    """
    meta = []
    if info.get("year"):
        meta.append(str(int(info["year"])))
    if info.get("tags"):
        meta.append(", ".join(info["tags"]))
    extra = {k: v for k, v in (info.get("extra") or {}).items() if v}
    facts = "".join(f" {k}: {v}." for k, v in extra.items())
    paren = f" ({'; '.join(meta)})" if meta else ""
    return (f"Describe the {noun} \"{info['title']}\"{paren} in 3 sentences: its {_ITEM_FACTORS}.{facts}")


def reflect_prompt(history_part: str, reasoning: str, noun: str = "movie") -> str:
    """R4ec reflector: check the reasoning against the user's ratings and name what they contradict.

    Example:
        >>> "contradict" in reflect_prompt("A user rated ...", "The user loves horror.")
        True
    """
    return (f"{history_part}\n"
            f"Someone described this user's taste:\n\"{reasoning.strip()}\"\n"
            f"Check the description against the ratings. In 2 sentences, name the claims that the ratings "
            f"contradict and the {noun}s that show it. If nothing is wrong, say what is missing.")


def refine_prompt(history_part: str, reasoning: str, critique: str, noun: str = "movie") -> str:
    """R4ec actor: rewrite the reasoning using the reflector's critique.

    Example:
        >>> p = refine_prompt("A user rated ...", "Loves horror.", "Rated every horror movie 1.")
        >>> "Critique" in p and "3 sentences" in p
        True
    """
    return (f"{history_part}\n"
            f"Old description of the user's taste: \"{reasoning.strip()}\"\n"
            f"Critique: \"{critique.strip()}\"\n"
            f"Write a corrected description of this user's {noun} taste in 3 sentences: which {_USER_FACTORS} "
            f"they like, and what they dislike.")


def user_encoder_text(generated: str, history_part: str) -> str:
    """What KAR's text encoder reads for a user: the generated reasoning *and* the stated history.

    The reasoning comes first: a sentence encoder truncates long inputs (MiniLM at 256 word pieces),
    and the history alone is already ~300, so truncation should cut the end of the history, not the
    reasoning.
    """
    return f"{generated.strip()}\n{history_part}"
