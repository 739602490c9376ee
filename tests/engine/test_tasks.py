"""Task kinds are looked up by the adapter's task name: every task an adapter may name has one, an unknown
name is one error listing the known ones, and a new kind registered by name is what the session uses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from strataprune.contract.errors import ConfigError
from strataprune.contract.layout import TASKS
from strataprune.engine.bos import bos_per_window
from strataprune.engine.recipe import recipe_from_dict
from strataprune.engine.session import PruningSession
from strataprune.engine.tasks.base import KINDS, TaskKind, register
from strataprune.engine.tasks.kinds import known_tasks, task_kind
from strataprune.models.loading import load_model

QUIET = dict(show_progress=False, log=lambda _: None)


def tiny_recipe(model_dir, text_file):
    return recipe_from_dict(
        {
            "model": {"source": str(model_dir)},
            "calibration": {"source": str(text_file), "nsamples": 2, "seqlen": 16},
            "evaluation": {"source": str(text_file), "seqlen": 16, "max_windows": 2, "dense": False},
            "sparsity": 0.5,
            "threads": 1,
        }
    )


def test_every_task_an_adapter_may_name_has_a_kind():
    assert set(TASKS) <= set(known_tasks())
    assert task_kind("causal-lm").reads_text and task_kind("causal-lm").supports_recovery
    for name in ("image-classification", "image-embedding", "multimodal"):
        kind = task_kind(name)
        assert kind.name == name and not kind.reads_text and not kind.supports_recovery and not kind.screens


def test_an_unknown_task_is_one_error_listing_the_known_ones():
    with pytest.raises(ConfigError) as info:
        task_kind("speech-recognition")
    assert str(info.value) == (
        "task 'speech-recognition' has no task kind; known tasks: causal-lm, image-classification, image-embedding, multimodal"
    )


def test_a_model_whose_task_has_no_kind_fails_in_prepare_before_any_data(tiny_llama_dir, text_file):
    loaded = load_model(str(tiny_llama_dir))
    loaded.adapter.task = "speech-recognition"  # this test's own adapter instance
    session = PruningSession(tiny_recipe(tiny_llama_dir, text_file), **QUIET)
    with pytest.raises(ConfigError, match="known tasks: causal-lm, "):
        session.prepare(loaded)
    assert "load data" not in session.timer.times


def test_a_registered_kind_is_the_one_the_session_asks(tiny_llama_dir, text_file):
    calls = []
    text = task_kind("causal-lm")

    @register("text-under-test")
    class Recording(TaskKind):
        def calibration(self, recipe, loaded, plugins, timer):
            calls.append([p.kind for p in plugins])
            return text.calibration(recipe, loaded, plugins, timer)

    try:
        assert task_kind("text-under-test").name == "text-under-test"
        with pytest.raises(ConfigError, match="registered twice"):
            register("text-under-test")(type("Other", (TaskKind,), {}))
        loaded = load_model(str(tiny_llama_dir))
        loaded.adapter.task = "text-under-test"
        session = PruningSession(tiny_recipe(tiny_llama_dir, text_file), **QUIET)
        session.prepare(loaded)
        assert calls == [["allocator", "pruner"]] and session.task is task_kind("text-under-test")
        assert session.calibrator.input_ids.shape == (2, 16)
    finally:
        KINDS.pop("text-under-test", None)


@pytest.mark.parametrize(
    ("mode", "adapter_says", "expected"),
    [("always", False, True), ("never", True, False), ("auto", True, True), ("auto", False, False)],
)
def test_bos_rule(mode, adapter_says, expected):
    asked = []
    loaded = SimpleNamespace(model="the model", adapter=SimpleNamespace(bos_per_window=lambda m: asked.append(m) or adapter_says))
    assert bos_per_window(mode, loaded) is expected
    assert asked == (["the model"] if mode == "auto" else [])  # only 'auto' asks the adapter
