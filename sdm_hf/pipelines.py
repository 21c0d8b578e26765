"""``pipeline("sdm-verify")`` and ``pipeline("sdm-text-classification")``.

``import sdm_hf`` registers both tasks with transformers' ``PIPELINE_REGISTRY``. Each loads
the model as usual and its SDM head from the model repository's ``sdm_head/`` subfolder, or
from an explicit ``sdm_head=`` (an :class:`~sdm_hf.SDMHead`, a folder or a Hub repo id —
needed for PEFT adapter repositories). Inputs are batched ``batch_size`` at a time through
the model and then searched against the support set in one go.

``sdm-verify`` is the test-time use of an SDM language model (Schmaltz (2025),
*Similarity-Distance-Magnitude Language Models*, §3.4): generate greedily, then let the
verification head, not the LM's own ``<verified>Yes/No</verified>`` text, decide whether
the completion follows the instructions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoModel, AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .features import extract_features
from .head.modeling import SDMHead
from .hub import DEFAULT_HEAD_SUBFOLDER, check_pairing
from .lm.encoding import ControlTokens, generate_greedy, verification_features

__all__ = ["SDMTextClassificationPipeline", "SDMVerifyPipeline", "register_pipelines"]


def _resolve_head(sdm_head, model, subfolder: str, device) -> SDMHead:
    if isinstance(sdm_head, SDMHead):
        head = sdm_head
    else:
        source = sdm_head
        sub = None if sdm_head is not None else subfolder
        if source is None:
            source = getattr(getattr(model, "config", None), "_name_or_path", None)
        if not source:
            raise ValueError(
                "no SDM head: the model has no repository path to look for a "
                f"'{subfolder}/' subfolder in; pass sdm_head=<SDMHead, folder or repo id>"
            )
        local = Path(str(source)) / (sub or "")
        if Path(str(source)).is_dir() and not (local / "config.json").is_file():
            raise ValueError(
                f"{source} has no SDM head in '{sub}/' (no {local / 'config.json'}); pass sdm_head=<SDMHead, "
                "folder or repo id>, e.g. for a PEFT adapter repository"
            )
        head = SDMHead.from_pretrained(source, subfolder=sub)
    return head.to(device)


class _SDMPipelineBase(Pipeline):
    """Shared plumbing: head resolution, option checking, batching."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True
    _options: tuple[str, ...] = ()

    def _run(self, items: list, batch_size: int, **options) -> list:
        """Results for ``items`` (one per item), ``batch_size`` at a time; each task defines it."""
        raise NotImplementedError

    def __init__(self, *args, sdm_head=None, head_subfolder: str = DEFAULT_HEAD_SUBFOLDER, **kwargs):
        super().__init__(*args, **kwargs)
        self.sdm_head = _resolve_head(sdm_head, self.model, head_subfolder, self.device)

    def _sanitize_parameters(self, **kwargs):
        unknown = sorted(set(kwargs) - set(self._options))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for the {self.task or type(self).__name__} pipeline; "
                f"valid options: {sorted(self._options)}"
            )
        return {}, {}, dict(kwargs)

    def __call__(self, inputs, batch_size: int | None = None, **kwargs):
        _, _, options = self._sanitize_parameters(**kwargs)
        options = {**self._postprocess_params, **options}
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        if not items:
            raise ValueError("no inputs: pass a string, a dict or a non-empty list of them")
        results = self._run(items, batch_size or self._batch_size or 8, **options)
        return results[0] if single else results

    # Pipeline's abstract hooks: one input at a time through the batched path.
    def preprocess(self, input_, **kwargs):
        return {"item": input_}

    def _forward(self, model_inputs, **kwargs):
        return {"result": self._run([model_inputs["item"]], 1, **kwargs)[0]}

    def postprocess(self, model_outputs, **kwargs):
        return model_outputs["result"]

    def _nearest(self, index: int) -> dict:
        head = self.sdm_head
        if index < 0 or head.support is None:
            return {"index": None, "id": None, "label": None, "text": None}
        label = int(head.support.labels[index])
        return {
            "index": index,
            "id": None if head.support_ids is None else head.support_ids[index],
            "label": head.config.label_name(label),
            "text": None if head.support_texts is None else head.support_texts[index],
        }


class SDMTextClassificationPipeline(_SDMPipelineBase):
    """Text classification with an SDM head over pooled features of an encoder (or any model).

    Example::

        from transformers import pipeline
        import sdm_hf  # registers the task
        clf = pipeline("sdm-text-classification", model="path/to/model-with-sdm_head")
        clf("Paris is a name of a city.")
        # {'label': 'true', 'score': 0.97, 'high_reliability': True, 'high_reliability_lower': True,
        #  'is_ood': False, 'q': 41, 'd': 0.62, 'rescaled_similarity': 2.9, 'truncated': False,
        #  'nearest_exemplar': {'index': 12, 'id': ..., 'label': 'true', 'text': ...}}

    Output per input: ``label`` (the head's ``id2label`` name), ``score`` (the SDM
    probability of that label), ``high_reliability``, ``high_reliability_lower``, ``is_ood``,
    ``q``, ``d``, ``rescaled_similarity``, ``truncated`` (the text was cut to the feature
    recipe's max length) and ``nearest_exemplar``. Features follow the head's recorded recipe
    (pooling, layer, max length).
    """

    def _run(self, texts, batch_size, **_):
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("sdm-text-classification takes strings (or a list of strings)")
        cfg = self.sdm_head.config
        check_pairing(self.model, self.sdm_head)
        limit = cfg.feature_max_length or getattr(self.tokenizer, "model_max_length", 512)
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        feats = extract_features(
            self.model,
            self.tokenizer,
            texts,
            pooling=cfg.feature_pooling or "mean",
            layer=-1 if cfg.feature_layer is None else cfg.feature_layer,
            batch_size=batch_size,
            max_length=limit,
            progress=False,
        )
        out = self.sdm_head.predict(feats)
        rows = []
        for i, record in enumerate(out.to_list(cfg.id2label)):
            rows.append(
                {
                    "label": record["label"],
                    "score": record["probability"],
                    "high_reliability": record["high_reliability"],
                    "high_reliability_lower": record["high_reliability_lower"],
                    "is_ood": record["is_ood"],
                    "q": record["q"],
                    "d": record["d"],
                    "rescaled_similarity": record["rescaled_similarity"],
                    "truncated": lengths[i] > limit,
                    "nearest_exemplar": self._nearest(record["nearest_index"]),
                }
            )
        return rows


class SDMVerifyPipeline(_SDMPipelineBase):
    """Generate with a causal LM, then verify the generation with its SDM verification head.

    Input: a prompt (string or chat messages: generate greedily, then verify), a dict
    ``{"prompt": ..., "completion": ...}`` (verify only), or a list of either.

    Output per input: ``generated_text`` (the completion), ``verified`` (the head predicts
    class 1: the completion follows the instructions), ``probability`` (the SDM probability
    of class 1), ``high_reliability``, ``high_reliability_lower``, ``q``, ``d``,
    ``rescaled_similarity``, ``is_ood``, ``nearest_exemplar`` (index, id, label, text) and
    ``model_said`` (what the LM's own trailing ``<verified>`` text claimed, or None).

    How this differs from transformers' ``decision`` pipeline, which returns the model's own
    yes/no probabilities: the verdict here comes from a separate SDM head, its probability
    is calibrated with a high-reliability region whose class- and prediction-conditional
    accuracy is at least alpha on data like the calibration data, it flags inputs unlike the
    training data (``is_ood``, small ``q`` and ``d``), and it is explained by the nearest
    training exemplar. The LM's own Yes/No text is not trusted; ``force_decode=True``
    rewrites the trailing control tokens of ``generated_text`` to the head's decision.

    Options (at construction or per call): ``max_new_tokens`` (default 64),
    ``force_decode`` (default False), ``generate_kwargs`` (a dict passed to ``generate``).
    """

    _pipeline_calls_generate = False  # generation is done explicitly, batched, in _run
    _options = ("max_new_tokens", "force_decode", "generate_kwargs")

    def __init__(self, *args, control_tokens: ControlTokens | None = None, **kwargs):
        options = {k: kwargs.pop(k) for k in self._options if k in kwargs}
        super().__init__(*args, **kwargs)
        self.control = control_tokens or ControlTokens()
        self._postprocess_params = options
        if self.tokenizer is None:
            raise ValueError("the sdm-verify pipeline needs the model's tokenizer (pass tokenizer=...)")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _check_lengths(self, prompts, completions) -> None:
        """Refuse documents longer than the model's context: truncating a prompt or completion
        would verify a different text, so it is an error naming the input, not a silent cut."""
        from .lm.encoding import format_document

        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if not limit:
            return
        tokenizer: Any = self.tokenizer
        texts = [format_document(tokenizer, p, self.control.add(c, True)) for p, c in zip(prompts, completions)]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        too_long = [(i, n) for i, n in enumerate(lengths) if n > limit]
        if too_long:
            i, n = too_long[0]
            raise ValueError(
                f"input {i} is {n} tokens long with its completion; the model reads at most {limit}: "
                "shorten the prompt or lower max_new_tokens"
            )

    def _run(self, items, batch_size, max_new_tokens=64, force_decode=False, generate_kwargs=None):
        prompts, completions, to_generate = [], [], []
        for i, item in enumerate(items):
            if isinstance(item, dict):
                if "prompt" not in item or "completion" not in item:
                    raise ValueError(f"input {i}: a dict input needs 'prompt' and 'completion' keys")
                prompts.append(item["prompt"])
                completions.append(str(item["completion"]))
            elif isinstance(item, (str, list)):
                prompts.append(item)
                completions.append(None)
                to_generate.append(i)
            else:
                raise TypeError(f"input {i}: expected a prompt string, chat messages or a dict, got {type(item)}")
        if to_generate:
            generated = generate_greedy(
                self.model,
                self.tokenizer,
                [prompts[i] for i in to_generate],
                max_new_tokens,
                batch_size,
                **dict(generate_kwargs or {}),
            )
            for i, text in zip(to_generate, generated):
                completions[i] = text
        self._check_lengths(prompts, completions)
        feats = verification_features(
            self.model, self.tokenizer, prompts, completions, self.control, batch_size=batch_size
        )
        out = self.sdm_head.predict(feats)
        rows = []
        for i, record in enumerate(out.to_list()):
            verified = bool(out.prediction[i] == 1)
            text = completions[i]
            if force_decode:
                text = self.control.add(text, verified)
            rows.append(
                {
                    "generated_text": text,
                    "verified": verified,
                    "probability": float(out.probabilities[i, 1]),
                    "high_reliability": record["high_reliability"],
                    "high_reliability_lower": record["high_reliability_lower"],
                    "q": record["q"],
                    "d": record["d"],
                    "rescaled_similarity": record["rescaled_similarity"],
                    "is_ood": record["is_ood"],
                    "model_said": self.control.decision(completions[i]),
                    "nearest_exemplar": self._nearest(record["nearest_index"]),
                }
            )
        return rows


def register_pipelines() -> None:
    """Register ``sdm-verify`` and ``sdm-text-classification`` (idempotent)."""
    for task, cls, model_class in (
        ("sdm-text-classification", SDMTextClassificationPipeline, AutoModel),
        ("sdm-verify", SDMVerifyPipeline, AutoModelForCausalLM),
    ):
        if PIPELINE_REGISTRY.supported_tasks.get(task, {}).get("impl") is not cls:
            PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=cls, pt_model=model_class, type="text")
