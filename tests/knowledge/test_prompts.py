"""KAR / R4ec prompts: content (titles, ratings, profile, factors), length, versions."""

from __future__ import annotations

import pytest

from cocorec.knowledge import prompts as P

HISTORY = [("Heat", 1995, 5), ("Babe", 1995, 2), ("Casablanca", 1942, 4)]
PROFILE = {"gender": "female", "age": "25-34", "occupation": "writer", "zip": "unknown"}


def test_user_prompt_has_profile_titles_ratings_and_factors():
    p = P.user_prompt(PROFILE, HISTORY)
    assert "female, age 25-34, writer" in p and "unknown" not in p
    assert "Heat (1995): 5" in p and "Babe (1995): 2" in p and "Casablanca (1942): 4" in p
    assert p.index("Heat") < p.index("Babe") < p.index("Casablanca")  # oldest first
    for word in ("genres", "directors or actors", "era and country", "plots and themes", "mood", "acclaim",
                 "dislike"):
        assert word in p
    assert "1 (bad) to 5 (great)" in p


def test_user_prompt_without_years_and_label_only_data():
    p = P.user_prompt({}, [("Heat", None, 5), ("Babe", None, 2)], has_ratings=False, noun="item")
    assert p.startswith("A user rated these items")
    assert "Heat: liked" in p and "Babe: disliked" in p
    assert "item taste" in p


def test_item_prompt_has_title_year_genres_and_the_same_factors():
    p = P.item_prompt({"title": "Heat", "year": 1995, "tags": ["Action", "Crime"], "extra": {"plot": "a heist"}})
    assert '"Heat" (1995; Action, Crime)' in p
    for word in ("genre", "director and main actors", "era and country", "plot and theme", "mood", "acclaim"):
        assert word in p
    assert "plot: a heist." in p
    assert '"Nameless"' in P.item_prompt({"title": "Nameless", "year": None, "tags": []})
    assert "(" not in P.item_prompt({"title": "Nameless", "year": None, "tags": []})


def test_reflect_and_refine_prompts_carry_history_reasoning_and_critique():
    hist = P.user_history_part(PROFILE, HISTORY)
    r = P.reflect_prompt(hist, "  The user loves family films like Babe. ")
    assert hist in r and '"The user loves family films like Babe."' in r and "contradict" in r
    f = P.refine_prompt(hist, "Loves family films.", "Babe was rated 2.")
    assert hist in f and "Loves family films." in f and "Babe was rated 2." in f and "corrected" in f


def test_encoder_text_puts_the_generation_before_the_history():
    hist = P.user_history_part(PROFILE, HISTORY)
    t = P.user_encoder_text(" Likes crime dramas. ", hist)
    assert t.startswith("Likes crime dramas.\n") and t.endswith(hist)


def test_prompt_with_30_long_titles_stays_short():
    # ~30 history items of long MovieLens titles: the prompt must fit a small LM's context easily.
    hist = [(f"Some Rather Long Movie Title Number {k}, The (Original Title)", None, 1 + k % 5) for k in range(30)]
    p = P.user_prompt(PROFILE, hist)
    assert len(p) < 2600
    assert len(p.split()) < 450


def test_versions_cover_every_template():
    assert set(P.TEMPLATE_VERSIONS) == {"user", "item", "reflect", "refine"}
    assert len(set(P.TEMPLATE_VERSIONS.values())) == 4


@pytest.mark.parametrize("profile,expected", [({"gender": "M", "age": "20"}, "M, age 20"),
                                              ({"gender": "unknown"}, ""), ({"city": "Paris"}, "city Paris")])
def test_profile_phrase(profile, expected):
    assert P.profile_phrase(profile) == expected
