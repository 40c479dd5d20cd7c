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

**The domain.** Every prompt takes the dataset's :class:`~cocorec.data.raw.Domain` (``domain=``):
the item noun, the scenario factors, the system message (:func:`system_message`), the profile
wording and, for implicit feedback, the history's wording: what the user interacted with, with the
count and what it means (``domain.feedback_meaning``), never a 1-5 rating. Without ``domain`` a
prompt is MovieLens' (``noun`` and ``has_ratings`` as given), and MovieLens' domain gives exactly
those prompts, byte for byte: the LM text caches are keyed by the exact prompt.

Every template has a version in :data:`TEMPLATE_VERSIONS`; it is part of the cache key of the
generated text, so editing a template (and bumping its version) never reuses stale text. A domain's
wording is in the prompt text itself (and its system message in the cache namespace), so another
domain never shares a cached text.

Example:
    >>> p = user_prompt({"gender": "female", "age": "25-34"}, [("Heat", 1995, 5), ("Babe", 1995, 2)])
    >>> "Heat (1995): 5" in p and "genres" in p
    True
    >>> "director" in item_prompt({"title": "Heat", "year": 1995, "tags": ["Action"]})
    True
    >>> from cocorec.data.raw import Domain
    >>> apps = Domain(item_noun="app", item_noun_plural="apps", feedback="implicit",
    ...               feedback_meaning="times opened", factors=("category", "price"))
    >>> print(user_prompt({}, [("Maps", None, 5), ("Mail", None, 5)], domain=apps, counts=[3, 40]))
    ... # doctest: +NORMALIZE_WHITESPACE
    A user interacted with these apps, oldest first, with the times opened in parentheses:
    Maps (3); Mail (40)
    Describe this user's app taste in 3 sentences: which category and price they like, and what they seem
    less interested in.
    >>> system_message(apps)
    'You are an app expert. Answer briefly and concretely.'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cocorec.data.raw import MOVIELENS, MOVIELENS_FACTORS, Domain

__all__ = [
    "FACTORS",
    "SYSTEM",
    "TEMPLATE_VERSIONS",
    "factor_phrases",
    "history_line",
    "item_prompt",
    "profile_phrase",
    "reflect_prompt",
    "refine_prompt",
    "system_message",
    "user_history_part",
    "user_prompt",
    "user_encoder_text",
]

#: The scenario factors of the movie domain (KAR's factorisation; ``MOVIELENS.factors``).
FACTORS: tuple[str, ...] = MOVIELENS_FACTORS

#: System message of every MovieLens generation (part of each cache key through the generation
#: settings); another domain's is :func:`system_message`.
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


def system_message(domain: Domain | None = None) -> str:
    """The system message of every generation for ``domain`` (MovieLens' :data:`SYSTEM` without one).

    Example:
        >>> system_message(MOVIELENS) == SYSTEM
        True
        >>> system_message(Domain(item_noun="book"))
        'You are a book expert. Answer briefly and concretely.'
    """
    noun = (domain or MOVIELENS).item_noun
    article = "an" if noun[:1].lower() in "aeiou" else "a"
    return f"You are {article} {noun} expert. Answer briefly and concretely."


def _join(words: Sequence[str]) -> str:
    if len(words) <= 2:
        return " and ".join(words)
    return ", ".join(words[:-1]) + ", and " + words[-1]


def factor_phrases(domain: Domain | None = None) -> tuple[str, str]:
    """How the domain's scenario factors are asked about: (in the user prompts, in the item prompts).

    MovieLens' factors keep their hand-written phrases; any other list is joined as written
    (``a/b`` read as ``a and b``).

    Example:
        >>> factor_phrases(Domain(factors=("category", "price/value", "developer")))
        ('category, price and value, and developer', 'category, price and value, and developer')
    """
    factors = tuple((domain or MOVIELENS).factors)
    if factors == MOVIELENS_FACTORS:
        return _USER_FACTORS, _ITEM_FACTORS
    phrase = _join([f.strip().replace("/", " and ") for f in factors])
    return phrase, phrase


def profile_phrase(profile: Mapping[str, str], domain: Domain | None = None) -> str:
    """``{"gender": "male", "age": "18-24", "occupation": "student"}`` -> ``"male, age 18-24, student"``.

    Unknown or empty values are left out; other columns are shown as ``key value`` (or as the
    domain's ``profile_fields`` word them).
    """
    if domain is not None:
        return domain.profile_phrase(dict(profile))
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


def _count(c: Any) -> str:
    c = float(c)
    return str(int(c)) if c.is_integer() else f"{c:g}"


def history_line(history: Sequence[tuple[str, Any, int]], has_ratings: bool = True, *,
                 domain: Domain | None = None, counts: Sequence[float] | None = None) -> str:
    """``[(title, year, rating)]`` -> ``"Heat (1995): 5; Babe (1995): 2"`` (oldest first).

    Label-only data (``has_ratings=False``) shows ``liked`` / ``disliked`` instead of the rating.
    Implicit feedback (an implicit ``domain``) shows no rating at all: the title alone, or with its
    count in parentheses (``"Maps (3); Mail (40)"``).
    """
    if domain is not None and domain.implicit:
        if counts is None:
            return "; ".join(_title(t, y) for t, y, _ in history)
        return "; ".join(f"{_title(t, y)} ({_count(c)})" for (t, y, _), c in zip(history, counts))
    if has_ratings:
        return "; ".join(f"{_title(t, y)}: {int(r)}" for t, y, r in history)
    return "; ".join(f"{_title(t, y)}: {'liked' if r >= 4 else 'disliked'}" for t, y, r in history)


def user_history_part(profile: Mapping[str, str], history: Sequence[tuple[str, Any, int]],
                      has_ratings: bool = True, noun: str = "movie", *, domain: Domain | None = None,
                      counts: Sequence[float] | None = None) -> str:
    """The part of the user prompt that states the facts (profile + rated history).

    KAR encodes the generated reasoning together with this part (see :func:`user_encoder_text`).
    With ``domain``, its plural noun and profile wording; implicit feedback lists what the user
    interacted with (with ``counts`` and what they mean, when the data has counts).
    """
    who = profile_phrase(profile, domain)
    who = f"A user ({who})" if who else "A user"
    line = history_line(history, has_ratings, domain=domain, counts=counts)
    if domain is None:
        things = f"{noun}s"
    else:
        things = domain.item_noun_plural
        if domain.implicit:
            how = f", with the {domain.feedback_meaning} in parentheses" if counts is not None else ""
            return f"{who} interacted with these {things}, oldest first{how}:\n{line}"
    scale = "from 1 (bad) to 5 (great)" if has_ratings else "as liked or disliked"
    return f"{who} rated these {things} {scale}, oldest first:\n{line}"


def _taste_task(noun: str, domain: Domain | None) -> str:
    """``"{noun} taste in 3 sentences: which <factors> they like, and what they dislike."``"""
    factors = factor_phrases(domain)[0]
    other = "what they seem less interested in" if domain is not None and domain.implicit else "what they dislike"
    return f"{noun} taste in 3 sentences: which {factors} they like, and {other}."


def user_prompt(profile: Mapping[str, str], history: Sequence[tuple[str, Any, int]], has_ratings: bool = True,
                noun: str = "movie", *, domain: Domain | None = None, counts: Sequence[float] | None = None) -> str:
    """KAR user preference reasoning over the scenario factors (the domain's, with ``domain``).

    Example:
        >>> print(user_prompt({"gender": "male"}, [("Heat", 1995, 4)]))  # doctest: +NORMALIZE_WHITESPACE
        A user (male) rated these movies from 1 (bad) to 5 (great), oldest first:
        Heat (1995): 4
        Describe this user's movie taste in 3 sentences: which genres, directors or actors, era and country,
        plots and themes, mood, and critical acclaim they like, and what they dislike.
    """
    noun = domain.item_noun if domain is not None else noun
    part = user_history_part(profile, history, has_ratings, noun, domain=domain, counts=counts)
    return f"{part}\nDescribe this user's {_taste_task(noun, domain)}"


def item_prompt(info: Mapping[str, Any], noun: str = "movie", *, domain: Domain | None = None) -> str:
    """KAR item facts over the same factors (title, year and tags given as anchors).

    Example:
        >>> print(item_prompt({"title": "Heat", "year": 1995, "tags": ["Action", "Crime"]}))
        ... # doctest: +NORMALIZE_WHITESPACE
        Describe the movie "Heat" (1995; Action, Crime) in 3 sentences: its genre, director and main actors,
        era and country, plot and theme, mood, and critical acclaim.
    """
    noun = domain.item_noun if domain is not None else noun
    meta = []
    if info.get("year"):
        meta.append(str(int(info["year"])))
    if info.get("tags"):
        meta.append(", ".join(info["tags"]))
    extra = {k: v for k, v in (info.get("extra") or {}).items() if v}
    facts = "".join(f" {k}: {v}." for k, v in extra.items())
    paren = f" ({'; '.join(meta)})" if meta else ""
    return (f"Describe the {noun} \"{info['title']}\"{paren} in 3 sentences: its {factor_phrases(domain)[1]}.{facts}")


def reflect_prompt(history_part: str, reasoning: str, noun: str = "movie", *, domain: Domain | None = None) -> str:
    """R4ec reflector: check the reasoning against the user's ratings (implicit feedback: against the
    history) and name what they contradict.

    Example:
        >>> "contradict" in reflect_prompt("A user rated ...", "The user loves horror.")
        True
    """
    things = domain.item_noun_plural if domain is not None else f"{noun}s"
    evidence = "history" if domain is not None and domain.implicit else "ratings"
    return (f"{history_part}\n"
            f"Someone described this user's taste:\n\"{reasoning.strip()}\"\n"
            f"Check the description against the {evidence}. In 2 sentences, name the claims that the {evidence} "
            f"contradict{'s' if evidence == 'history' else ''} and the {things} that show it. If nothing is wrong, "
            f"say what is missing.")


def refine_prompt(history_part: str, reasoning: str, critique: str, noun: str = "movie", *,
                  domain: Domain | None = None) -> str:
    """R4ec actor: rewrite the reasoning using the reflector's critique.

    Example:
        >>> p = refine_prompt("A user rated ...", "Loves horror.", "Rated every horror movie 1.")
        >>> "Critique" in p and "3 sentences" in p
        True
    """
    noun = domain.item_noun if domain is not None else noun
    return (f"{history_part}\n"
            f"Old description of the user's taste: \"{reasoning.strip()}\"\n"
            f"Critique: \"{critique.strip()}\"\n"
            f"Write a corrected description of this user's {_taste_task(noun, domain)}")


def user_encoder_text(generated: str, history_part: str) -> str:
    """What KAR's text encoder reads for a user: the generated reasoning *and* the stated history.

    The reasoning comes first: a sentence encoder truncates long inputs (MiniLM at 256 word pieces),
    and the history alone is already ~300, so truncation should cut the end of the history, not the
    reasoning.
    """
    return f"{generated.strip()}\n{history_part}"
