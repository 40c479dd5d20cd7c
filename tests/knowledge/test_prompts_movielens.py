"""MovieLens' prompts and texts are pinned byte for byte: the LM text caches are keyed by the exact prompt
(and the system message), so a change of wording for MovieLens would orphan hours of generated texts.

The pins were computed with the code before prompts took the data's domain (commit 95b4b78) and are
unchanged by it. Change them only together with a template version bump (prompts.TEMPLATE_VERSIONS).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cocorec.data import MOVIELENS, Domain
from cocorec.knowledge import kar
from cocorec.knowledge import prompts as P
from cocorec.knowledge.sources import UserSource
from tests.conftest import write_generic
from tests.data.helpers import edit_spec

HISTORY = [("Heat", 1995, 5), ("Babe", None, 2), ("Casablanca", 1942, 4)]
PROFILE = {"gender": "female", "age": "25-34", "occupation": "writer", "zip": "unknown"}


def movielens_text_hash(data) -> str:
    """Every text an LM or encoder reads about ``data``: the user and item texts, KAR's user and item
    prompts and history parts, R4ec's reflect and refine prompts, the encoder inputs, and the source
    user texts (lm, shuffled, template, oracle; clean and 30% corrupted)."""
    h = hashlib.sha256()

    def add(texts):
        for t in texts:
            h.update(t.encode("utf-8") + b"\x00")

    users, items = range(data.n_users), range(1, data.spec.n_items)
    add(data.user_text)
    add(data.item_text)
    add(kar.item_prompt(data, i) for i in items)
    for source in ("lm", "shuffled", "template", "oracle"):
        for corrupt in (0.0, 0.3):
            src = UserSource(data, source, corrupt, seed=0)
            add(src.user_texts())
            if source in ("lm", "shuffled"):
                view = src.view()
                hist = [kar.user_history_part(view, u) for u in users]
                add(kar.user_prompt(view, u) for u in users)
                add(hist)
                add(kar.reflect_prompt(view, x, " R. ") for x in hist)
                add(kar.refine_prompt(view, x, " R. ", " C. ") for x in hist)
                add(P.user_encoder_text(" G. ", x) for x in hist)
    return h.hexdigest()


@pytest.fixture(scope="module")
def ml_toy(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny generic dataset named ml-*: MovieLens' domain, hence MovieLens' wording."""
    from cocorec.data import prepare

    d = write_generic(tmp_path_factory.mktemp("ml-toy") / "mltoy", n_users=30, n_items=20, per_user=12, seed=3)
    edit_spec(d, lambda s: s.update(name="ml-toy"))
    return prepare(str(d))


def test_movielens_texts_are_pinned_on_a_tiny_ml_dataset(ml_toy):
    assert ml_toy.domain == MOVIELENS
    assert movielens_text_hash(ml_toy) == "ea1fde56be0b271a65fc41a257c530e38738778b7db376e66a73e1d55d6b9e90"


def test_movielens_texts_are_pinned_on_ml100k(ml100k):
    assert movielens_text_hash(ml100k) == "8b489eab636a1f192a338702b20621bf5ea7dd89470a686c697030afb85820a5"


def test_movielens_system_message_and_cache_namespace_are_unchanged():
    assert P.system_message(MOVIELENS) == P.system_message() == P.SYSTEM == (
        "You are a movie expert. Answer briefly and concretely.")

    class LM:
        identity = "fake:lm"

    store = kar.KnowledgeStore(LM(), "tiny", max_new_tokens=64, root="unused")
    assert store.generation_settings(P.system_message(MOVIELENS)) == {
        "max_new_tokens": 64, "system": "You are a movie expert. Answer briefly and concretely.", "decoding": "greedy"}
    assert store.namespace("user", P.SYSTEM) == store.namespace("user")
    assert store.namespace("user", P.system_message(Domain(item_noun="app"))) != store.namespace("user")


@pytest.mark.parametrize("has_ratings", [True, False])
def test_movielens_domain_words_every_prompt_as_no_domain_does(has_ratings):
    # the prompt functions without a domain are the MovieLens wording every cached text was generated from
    kw = dict(domain=MOVIELENS)
    assert P.user_prompt(PROFILE, HISTORY, has_ratings, **kw) == P.user_prompt(PROFILE, HISTORY, has_ratings)
    part = P.user_history_part(PROFILE, HISTORY, has_ratings)
    assert P.user_history_part(PROFILE, HISTORY, has_ratings, **kw) == part
    info = {"title": "Heat", "year": 1995, "tags": ["Action", "Crime"], "extra": {"plot": "a heist"}}
    assert P.item_prompt(info, **kw) == P.item_prompt(info)
    assert P.reflect_prompt(part, "Likes crime.", **kw) == P.reflect_prompt(part, "Likes crime.")
    assert P.refine_prompt(part, "Likes crime.", "Babe: 2.", **kw) == P.refine_prompt(part, "Likes crime.", "Babe: 2.")
    assert P.profile_phrase(PROFILE, MOVIELENS) == P.profile_phrase(PROFILE) == "female, age 25-34, writer"
    assert P.factor_phrases(MOVIELENS) == (P._USER_FACTORS, P._ITEM_FACTORS)
