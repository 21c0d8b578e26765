"""``pipeline("sdm-verify")``: generate with a causal LM, then verify with its SDM head.

Schmaltz (2025), Similarity-Distance-Magnitude Language Models, arXiv:2510.26183, §3.4: the verification
head, not the LM's own ``<verified>Yes/No</verified>`` text, decides whether a completion follows the
instructions. Usage and test-time search: docs/serving.md, section 'Pipelines'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...lm.control import ControlTokens, format_document
from ...lm.generation import generate_greedy, generate_sampled
from ...lm.verification_features import verification_features, verification_pooling_of
from ...repository import check_pairing
from .common import ACCEPTED, Numbered, SDMPipeline, as_columns, describe, first_row, is_chat, tiers

__all__ = ["SDMVerifyPipeline"]

# set by the pipeline itself (decoding of max_new_tokens over the prompt's tokens)
RESERVED_GENERATE_KWARGS = ("max_new_tokens", "do_sample", "use_cache", "pad_token_id", "input_ids", "attention_mask")


class SDMVerifyPipeline(SDMPipeline):
    """Generate with a causal LM, then verify the generation with its SDM verification head.

    Example::

        verify = pipeline("sdm-verify", model="path/to/sdm-lm", max_new_tokens=64)  # after import sdm_hf
        verify("Repeat: the birch canoe slid on the smooth planks.")   # generate greedily + verify
        verify({"prompt": "Repeat: ...", "completion": "..."})        # verify only

    Input: a prompt (string or chat messages ``[{"role", "content"}, ...]``), a ``{"prompt", "completion"}``
    dict, or a list / ``datasets`` column or Dataset / ``KeyDataset`` / generator / streaming
    ``IterableDataset`` of either (``[]`` gives ``[]``); ``batch_size`` (default 8) inputs run together.

    Output per input: ``generated_text``, ``verified`` (the head predicts class 1: it follows the
    instructions), ``probability`` (SDM probability of class 1), ``high_reliability``,
    ``high_reliability_lower``, ``q``, ``d``, ``rescaled_similarity``, ``is_ood``, ``nearest_exemplar`` and
    ``model_said`` (the LM's own trailing ``<verified>`` claim, or None; not trusted).

    Options (construction or call): ``max_new_tokens`` (64), ``force_decode`` (False: True rewrites the
    trailing control tokens to the head's verdict), ``generate_kwargs`` (decoding stays greedy),
    ``search_depth`` (1) and ``search_kwargs``. Construction only: ``sdm_head``, ``head_subfolder``,
    ``sdm_head_kwargs`` (as for ``sdm-text-classification``) and ``control_tokens``.

    Test-time search (``search_depth=N > 1``, generated inputs only): an input not verified inside the HR
    region gets up to N - 1 sampled attempts (``search_kwargs``, default ``temperature=1.0, top_p=0.95``;
    attempt k seeded ``seed + k``, ``seed`` default 0); the first verified inside the region is returned,
    else the greedy attempt with its own verdict. ``attempts`` then lists each attempt's ``generated_text``,
    ``verified``, ``probability``, ``high_reliability``, ``q`` and ``d``. Cost: up to N generations and
    verifications per unverified input.

    Raises:
        ValueError: the head reads composed features or another width (a head of another model only warns).
        TypeError / ValueError: (per call) a bad input, naming its index; a bad option; a document longer
            than the model's context.
    """

    _pipeline_calls_generate = False  # generation is done explicitly, batched, in _forward
    _options = ("max_new_tokens", "force_decode", "generate_kwargs", "search_depth", "search_kwargs")
    _accepts_chats = True

    def __init__(self, *args: Any, control_tokens: ControlTokens | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.control = control_tokens or ControlTokens()
        check_pairing(self.model, self.sdm_head, same_repository=self.head_from_model_repository)

    def check_input(self, item: Numbered) -> None:
        value = item.value
        if isinstance(value, Mapping):
            if "prompt" not in value or "completion" not in value:
                raise ValueError(
                    f"{item.where}: a dict input needs 'prompt' and 'completion' keys (got {sorted(map(str, value))}); "
                    "pass {'prompt': ..., 'completion': ...} to verify a completion, or the prompt alone to "
                    "generate one"
                )
            if not isinstance(value["completion"], str):
                raise TypeError(f"{item.where}: 'completion' is {describe(value['completion'])}; pass a string")
            self._check_prompt(value["prompt"], f"{item.where}: 'prompt'")
        else:
            self._check_prompt(value, item.where)

    def _check_prompt(self, prompt: Any, where: str) -> None:
        if isinstance(prompt, str) or is_chat(prompt):
            return
        kind = describe(prompt)
        if isinstance(prompt, (list, tuple)):
            kind += " but not chat messages (each a {'role', 'content'} dict)"
        raise TypeError(
            f"{where} is {kind}; the {self._name} pipeline takes a prompt (a string or chat messages) "
            f"or a {{'prompt', 'completion'}} dict: pass {ACCEPTED} of those"
        )

    def _sanitize_parameters(self, **kwargs: Any):
        self._check_options(kwargs)
        forward: dict[str, Any] = {}
        post: dict[str, Any] = {}
        for name, zero in (("max_new_tokens", ""), ("search_depth", " (1: no search)")):
            if name in kwargs:
                value = kwargs[name]
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name} must be a positive integer{zero}, got {value!r}")
                forward[name] = value
        why = {
            "generate_kwargs": "the pipeline decodes greedily over the prompt",
            "search_kwargs": "the search samples over the prompt",
        }
        for name, reason in why.items():
            if name in kwargs:
                extra = kwargs[name]
                if extra is not None and not isinstance(extra, Mapping):
                    raise TypeError(f"{name} must be a dict, got {type(extra).__name__}")
                clash = sorted(set(extra or {}) & set(RESERVED_GENERATE_KWARGS))
                if clash:
                    raise ValueError(f"{name} may not set {clash}: {reason}; pass max_new_tokens as its own option")
                forward[name] = dict(extra or {})
        if "force_decode" in kwargs:
            if not isinstance(kwargs["force_decode"], bool):
                raise TypeError(f"force_decode must be True or False, got {kwargs['force_decode']!r}")
            post["force_decode"] = kwargs["force_decode"]
        return {}, forward, post

    def preprocess(self, inputs: Any, **_: Any) -> dict[str, Any]:
        """One input -> ``{"index", "prompt", "completion"}`` (``completion`` None: generate it)."""
        item = inputs if isinstance(inputs, Numbered) else Numbered(None, inputs)
        self.check_input(item)
        value = item.value
        if isinstance(value, Mapping):
            prompt, completion = value["prompt"], value["completion"]
        else:
            prompt, completion = value, None
        return {"index": item.index, "prompt": list(prompt) if is_chat(prompt) else prompt, "completion": completion}

    def _check_lengths(self, indices: list, prompts: list, completions: list) -> None:
        """Raise ``ValueError`` for a document longer than the model's context (a cut would verify another text)."""
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if not limit:
            return
        tokenizer: Any = self.tokenizer
        texts = [format_document(tokenizer, p, self.control.add(c, True)) for p, c in zip(prompts, completions)]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for index, n in zip(indices, lengths):
            if n > limit:
                where = "the input" if index is None else f"input {index}"
                raise ValueError(
                    f"{where} is {n} tokens long with its completion; the model reads at most {limit}: "
                    "shorten the prompt or lower max_new_tokens"
                )

    def _forward(
        self,
        model_inputs: dict[str, Any],
        max_new_tokens: int = 64,
        generate_kwargs: dict | None = None,
        search_depth: int = 1,
        search_kwargs: dict | None = None,
    ) -> dict[str, list]:
        """B inputs -> columns of B values: greedy generation for those without a completion,
        verification features of every pair, one ``predict``; then the search if ``search_depth > 1``."""
        cols = as_columns(model_inputs)
        tokenizer: Any = self.tokenizer  # set: the base class refuses a pipeline without one
        prompts, completions = list(cols["prompt"]), list(cols["completion"])
        to_generate = [j for j, c in enumerate(completions) if c is None]
        if to_generate:
            generated = generate_greedy(
                self.model,
                tokenizer,
                [prompts[j] for j in to_generate],
                max_new_tokens,
                len(to_generate),
                **dict(generate_kwargs or {}),
            )
            for j, text in zip(to_generate, generated):
                completions[j] = text
        columns = self._verify(cols["index"], prompts, completions)
        if search_depth > 1 and to_generate:
            self._search(columns, prompts, to_generate, max_new_tokens, search_depth, dict(search_kwargs or {}))
        return columns

    def _search(
        self,
        columns: dict[str, list],
        prompts: list,
        searched: list[int],
        max_new_tokens: int,
        depth: int,
        search: dict,
    ) -> None:
        """Test-time search over inputs ``searched``: ``columns`` gain ``attempts`` and take the first HR-verified."""
        sampling = {"temperature": 1.0, "top_p": 0.95, **search}
        seed = int(sampling.pop("seed", 0))
        columns["attempts"] = [[] for _ in prompts]
        for j in searched:
            columns["attempts"][j].append(_attempt(columns, j))
        open_ = [j for j in searched if not _hr_verified(columns, j)]
        for k in range(1, depth):
            if not open_:
                break
            tokenizer: Any = self.tokenizer
            batch = [prompts[j] for j in open_]
            texts = generate_sampled(self.model, tokenizer, batch, max_new_tokens, len(batch), seed + k, **sampling)
            found = self._verify([columns["index"][j] for j in open_], [prompts[j] for j in open_], texts)
            for row, j in enumerate(open_):
                columns["attempts"][j].append(_attempt(found, row))
                if _hr_verified(found, row):  # the first HR-verified attempt replaces the greedy one
                    for key in ("record", "completion", "verified", "probability"):
                        columns[key][j] = found[key][row]
            open_ = [j for j in open_ if not _hr_verified(columns, j)]

    def _verify(self, indices: list, prompts: list, completions: list) -> dict[str, list]:
        """Columns of the head's verdict on each (prompt, completion) pair."""
        tokenizer: Any = self.tokenizer
        self._check_lengths(indices, prompts, completions)
        feats = verification_features(
            self.model,
            tokenizer,
            prompts,
            completions,
            self.control,
            batch_size=len(prompts),
            layer=-1 if self.sdm_head.config.feature_layer is None else self.sdm_head.config.feature_layer,
            pooling=verification_pooling_of(self.sdm_head.config.feature_pooling),
        )
        out = self.sdm_head.predict(feats)
        return {
            "index": list(indices),
            "record": out.to_list(),
            "completion": completions,
            "verified": (out.prediction == 1).tolist(),
            "probability": out.probabilities[:, 1].tolist(),
        }

    def postprocess(self, model_outputs: dict[str, Any], force_decode: bool = False) -> dict[str, Any]:
        """One input's record -> its result dict."""
        row = first_row(model_outputs)
        record, completion, verified = row["record"], row["completion"], bool(row["verified"])
        return {
            "generated_text": self.control.add(completion, verified) if force_decode else completion,
            "verified": verified,
            "probability": float(row["probability"]),
            "high_reliability": record["high_reliability"],
            "high_reliability_lower": record["high_reliability_lower"],
            "q": record["q"],
            "d": record["d"],
            "rescaled_similarity": record["rescaled_similarity"],
            "is_ood": record["is_ood"],
            "model_said": self.control.decision(completion),
            "nearest_exemplar": self._nearest(record["nearest_index"]),
            **tiers(record),
            **({"attempts": row["attempts"]} if row.get("attempts") else {}),
        }


def _hr_verified(columns: dict[str, list], j: int) -> bool:
    return bool(columns["verified"][j]) and bool(columns["record"][j]["high_reliability"])


def _attempt(columns: dict[str, list], j: int) -> dict[str, Any]:
    record = columns["record"][j]
    return {
        "generated_text": columns["completion"][j],
        "verified": bool(columns["verified"][j]),
        "probability": float(columns["probability"][j]),
        "high_reliability": record["high_reliability"],
        "q": record["q"],
        "d": record["d"],
    }
