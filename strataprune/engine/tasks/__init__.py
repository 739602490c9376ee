"""Kinds of task a run can prune for (causal LM, image classification, image embedding, multimodal).

``base`` defines what a task kind provides and the registry; ``causal_lm`` and ``images`` are the built-in
kinds; ``kinds.task_kind(adapter.task)`` looks one up.
"""
