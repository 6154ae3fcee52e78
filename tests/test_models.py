"""Models by name from a shared model cache (a workshop's): %serve and %finetune resolve a
bare name to the cache's folder; a path or a Hugging Face name is left as it is."""

from __future__ import annotations

import pytest

from aifab import models
from aifab.api import BadRequest, FineTuneOptions
from aifab.extension.kinds.finetune import check_options


def test_names_resolve_in_the_cache_and_nothing_else_changes(tmp_path, monkeypatch, tiny_model):
    cache = tmp_path / "models"
    cache.mkdir()
    (cache / "tiny-llama").symlink_to(tiny_model)
    (cache / "empty").mkdir()
    monkeypatch.setenv("AIFAB_MODEL_CACHE", str(cache))
    assert models.cached_models() == ["tiny-llama"]
    assert models.resolve("tiny-llama") == str(cache / "tiny-llama")
    assert models.resolve("empty") == "empty"  # no config.json: not a model
    assert models.resolve("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert models.resolve(str(tiny_model)) == str(tiny_model)

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    opts = check_options(FineTuneOptions(model="tiny-llama", data=str(data),
                                         output=str(tmp_path / "out")))
    assert opts.model == str(cache / "tiny-llama")
    with pytest.raises(BadRequest, match="the shared model cache has: tiny-llama"):
        check_options(FineTuneOptions(model="llama-3", data=str(data)))


def test_without_a_cache_names_stay_names(monkeypatch):
    monkeypatch.delenv("AIFAB_MODEL_CACHE", raising=False)
    assert models.cache_dir() is None and models.cached_models() == []
    assert models.resolve("tiny-llama") == "tiny-llama"
